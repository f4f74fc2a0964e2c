"""Do the policies serve their types? Generation-level evaluation on held-out prompts.

    reward[i][j] = mean true reward of type i over policy j's generations

The generations are MMRA's samples (`mmra_samples.jsonl`): every policy, the single-DPO
baseline and the reference, sampled exactly as serving samples (no truncation unless
configured) on prompts kept apart from training. The true rewards come from the synthetic
data's sidecar (`<data>.meta.json`). Intervals are percentile bootstraps over prompts.
A true type is served when its own policy (the learned type matched to it) earns it more
than every other type's policy and the reference. Beside that, each own policy against the
single-DPO policy trained on everyone: what EM-DPO claims to add over one policy.
"""

from __future__ import annotations

import numpy as np

from emdpo_ray.core.mmra import regret_matrix
from emdpo_ray.run.rundir import REFERENCE_NAME, SINGLE_DPO, type_name


def reward_table(rewards: np.ndarray, policy: np.ndarray, prompt: np.ndarray, num_policies: int,
                 replicates: int = 500, seed: int = 0, level: float = 0.95):
    """Mean [T, P] of `rewards` [S, T] per policy, and percentile intervals [T, P, 2] from
    resampling prompts (a prompt's samples move together)."""
    t = rewards.shape[1]
    mean = np.full((t, num_policies), np.nan)
    for p in range(num_policies):
        if (policy == p).any():
            mean[:, p] = rewards[policy == p].mean(0)
    prompts = np.unique(prompt)
    # per prompt and policy: reward sums and counts, so a replicate is two matrix products
    sums = np.zeros((len(prompts), num_policies, t))
    counts = np.zeros((len(prompts), num_policies))
    pi = np.searchsorted(prompts, prompt)
    np.add.at(sums, (pi, policy), rewards)
    np.add.at(counts, (pi, policy), 1)
    rng = np.random.default_rng(seed)
    reps = np.empty((replicates, t, num_policies))
    for b in range(replicates):
        m = np.bincount(rng.integers(0, len(prompts), len(prompts)), minlength=len(prompts))
        with np.errstate(invalid="ignore"):
            reps[b] = (np.einsum("q,qpt->tp", m, sums) / (m @ counts)[None, :])
    lo, hi = 50 * (1 - level), 50 * (1 + level)
    ci = np.stack([np.nanpercentile(reps, lo, 0), np.nanpercentile(reps, hi, 0)], -1)
    return mean, ci, reps


def served(mean: np.ndarray, ci: np.ndarray, own: np.ndarray, rivals: list[int]) -> dict:
    """Per true type t with own policy own[t]: is it the best of `rivals` (by mean, and with
    its interval above every rival's), and by how much it beats each rival's best."""
    best, separated, margin = [], [], []
    for t, o in enumerate(own):
        others = [j for j in rivals if j != o]
        if o < 0 or not others:
            best.append(False), separated.append(False), margin.append(None)
            continue
        best.append(bool(mean[t, o] > mean[t, others].max()))
        separated.append(bool(ci[t, o, 0] > ci[t, others, 1].max()))
        margin.append(float(mean[t, o] - mean[t, others].max()))
    return {"own_is_best": best, "own_is_best_separated": separated,
            "margin_over_next_best": margin}


def paired_margins(reps: np.ndarray, own: np.ndarray, rivals: list[int],
                   level: float = 0.95) -> dict:
    """Own policy minus each rival on the same resampled prompts (replicates `reps` [B, T,
    P]): a paired interval, narrower than comparing two intervals when prompts differ in
    difficulty. Per true type: the interval of the margin over the next best rival (by
    mean), and whether every rival's margin interval lies above zero."""
    lo, hi = 50 * (1 - level), 50 * (1 + level)
    mean = np.nanmean(reps, 0)
    margin_ci, beats = [], []
    for t, o in enumerate(own):
        others = [j for j in rivals if j != o]
        if o < 0 or not others:
            margin_ci.append(None), beats.append(False)
            continue
        diffs = reps[:, t, o][:, None] - reps[:, t, others]              # [B, rivals]
        nxt = int(np.argmax(mean[t, others]))
        margin_ci.append([float(np.nanpercentile(diffs[:, nxt], lo)),
                          float(np.nanpercentile(diffs[:, nxt], hi))])
        beats.append(bool((np.nanpercentile(diffs, lo, 0) > 0).all()))
    return {"margin_over_next_best_ci": margin_ci, "own_beats_every_rival_paired": beats}


def own_minus(mean: np.ndarray, reps: np.ndarray, own: np.ndarray, other: int, name: str,
              level: float = 0.95) -> dict:
    """Per true type: own policy minus policy `other` (mean [T, P], replicates [B, T, P]),
    with its paired interval (same resampled prompts); None where a type has no own policy.
    Keys `own_minus_<name>`, `..._ci`, and `own_above_<name>_paired` (interval above 0)."""
    lo, hi = 50 * (1 - level), 50 * (1 + level)
    diff, ci = [], []
    for t, o in enumerate(own):
        if o < 0:
            diff.append(None), ci.append(None)
            continue
        d = reps[:, t, o] - reps[:, t, other]
        diff.append(float(mean[t, o] - mean[t, other]))
        ci.append([float(np.nanpercentile(d, lo)), float(np.nanpercentile(d, hi))])
    return {f"own_minus_{name}": diff, f"own_minus_{name}_ci": ci,
            f"own_above_{name}_paired": [c is not None and c[0] > 0 for c in ci]}


def generation_eval(samples: list[dict], meta: dict, match: np.ndarray, k: int,
                    mixtures: dict[str, np.ndarray], seed: int = 0) -> dict:
    """The reward matrix, which types their own policy serves, and each type's true regret
    (against its own policy, as in the LP) for every mixture and single policy."""
    from emdpo_ray.data import synth

    present = {s["policy"] for s in samples}
    names = [type_name(j) for j in range(k)] + [n for n in (SINGLE_DPO, REFERENCE_NAME)
                                                if n in present]
    col = {n: i for i, n in enumerate(names)}
    keep = [s for s in samples if s["policy"] in col]
    prompts = sorted({s["prompt"] for s in keep})
    rewards = synth.true_rewards(meta, [s["prompt"] for s in keep], [s["text"] for s in keep]).T
    policy = np.array([col[s["policy"]] for s in keep])
    prompt = np.array([prompts.index(s["prompt"]) for s in keep])
    mean, ci, reps = reward_table(rewards, policy, prompt, len(names), seed=seed)
    own = np.asarray(match)
    rivals = list(range(k)) + ([col[REFERENCE_NAME]] if REFERENCE_NAME in col else [])
    out = {"policies": names, "true_types": rewards.shape[1], "own_policy": [
               names[o] if o >= 0 else None for o in own],
           "prompts": len(prompts), "samples": int(len(keep)),
           "reward": mean.tolist(), "reward_ci": ci.tolist(), **served(mean, ci, own, rivals)}
    out["types_served"] = int(sum(out["own_is_best"]))
    out.update(paired_margins(reps, own, rivals))
    for name in (REFERENCE_NAME, SINGLE_DPO):
        if name in col:
            out.update(own_minus(mean, reps, own, col[name], name))
    out["true_regret"] = true_regret(mean, reps, own, k, mixtures,
                                     {n: col[n] for n in (SINGLE_DPO, REFERENCE_NAME) if n in col})
    return out


def true_regret(mean: np.ndarray, reps: np.ndarray, own: np.ndarray, k: int,
                mixtures: dict[str, np.ndarray], singles: dict[str, int],
                level: float = 0.95) -> dict:
    """Each true type's regret, in its true reward, against its own policy (as in the LP),
    for every mixture of the K policies (weights [k]) and every other single policy (a
    column of mean [T, P]), with the max over types and its interval over resampled prompts
    (replicates [B, T, P]); with a `uniform` mixture, each one's max regret minus uniform's
    on the same replicates (`max_regret_minus_uniform_ci`): does the mixture beat the
    simplest one."""
    lo, hi = 50 * (1 - level), 50 * (1 + level)
    has_own = own >= 0
    own_idx = np.where(has_own, own, 0)
    own_reward = np.where(has_own, mean[np.arange(len(own)), own_idx], np.nan)     # [T]
    own_reps = reps[:, np.arange(len(own)), own_idx]                              # [B, T]

    def given(w: np.ndarray | None, c: int | None):
        got = mean[:, :k] @ w if w is not None else mean[:, c]
        got_reps = reps[:, :, :k] @ w if w is not None else reps[:, :, c]
        reg = own_reward - got
        reg_reps = np.where(has_own, own_reps - got_reps, np.nan)
        return reg, np.nanmax(reg_reps, 1)

    rows = {label: given(np.asarray(w, float), None) for label, w in mixtures.items()}
    rows.update({name: given(None, c) for name, c in singles.items()})
    out = {}
    for label, (reg, max_reps) in rows.items():
        out[label] = {"regret": reg.tolist(), "max_regret": float(np.nanmax(reg)),
                      "max_regret_ci": [float(np.nanpercentile(max_reps, lo)),
                                        float(np.nanpercentile(max_reps, hi))]}
        if "uniform" in rows and label != "uniform":
            d = max_reps - rows["uniform"][1]
            out[label]["max_regret_minus_uniform_ci"] = [float(np.nanpercentile(d, lo)),
                                                         float(np.nanpercentile(d, hi))]
    return out


def regret_fidelity(L: np.ndarray, mean: np.ndarray, own: np.ndarray) -> dict | None:
    """How well the LP's estimated regrets track the true ones: the Pearson correlation, over
    every true type i with an own policy o and every other policy j < K, of the estimate
    L[o, o] - L[o, j] (type o's log-ratio rewards, mmra.json) with the truth
    mean[i, o] - mean[i, j]. MMRA can only be as good as this; None with under 3 pairs."""
    est_regret, mean = regret_matrix(L), np.asarray(mean, float)
    k = len(est_regret)
    est, true = [], []
    for i, o in enumerate(np.asarray(own)):
        if o < 0:
            continue
        for j in range(k):
            if j != o:
                est.append(est_regret[o, j])
                true.append(mean[i, o] - mean[i, j])
    if len(est) < 3 or np.std(est) == 0 or np.std(true) == 0:
        return None
    return {"pearson": float(np.corrcoef(est, true)[0, 1]), "pairs": len(est)}
