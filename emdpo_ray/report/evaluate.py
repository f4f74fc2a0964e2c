"""`emdpo-ray eval --run RUN_DIR --data PATH`: how well a run recovered and serves the types.

Prints JSON with
- `ari`: adjusted Rand index of MAP types vs `true_type` (when records carry it);
- `type_accuracy`: per true type, the matched policy's accuracy on adjacent ranked pairs of
  that type's users (types matched by the Hungarian method on posterior mass);
- `eta` vs `true_shares` (matched order);
- `generations` (synthetic data with its `.meta.json`): the reward matrix of every policy's
  generations on held-out prompts under every true type, with intervals, and which types
  their own policy serves (report/generations.py); plots/rewards.png;
- `true_regret`: each true type's regret against its own policy under the true reward, for
  MMRA and every baseline, from the same generations; the largest over types with its
  interval over resampled prompts, and its paired difference from the uniform mixture's;
  `generations.regret_fidelity`: how closely the regrets MMRA solved for (its estimated
  log-ratio rewards) track these true ones.

The result is also written to the run directory (`eval.json`).
"""

from __future__ import annotations

import os

import numpy as np

from emdpo_ray.data.sources import load_records
from emdpo_ray.run.rundir import RunDir
from emdpo_ray.utils import read_json


def match_types(true_types: np.ndarray, gamma: np.ndarray, k_true: int) -> np.ndarray:
    """match[t] = learned type serving true type t (maximises shared posterior mass)."""
    from scipy.optimize import linear_sum_assignment

    conf = np.zeros((k_true, gamma.shape[1]))
    np.add.at(conf, true_types, gamma)
    rows, cols = linear_sum_assignment(-conf)
    match = np.full(k_true, -1)
    match[rows] = cols
    return match


def record_centred(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """x [N, m, ...] minus its record's mean over the unpadded responses (mask [N, m])."""
    w = mask.reshape(mask.shape + (1,) * (x.ndim - 2)).astype(float)
    return x - (x * w).sum(1, keepdims=True) / np.maximum(w.sum(1, keepdims=True), 1)


def within_record_r2(x: np.ndarray, mask: np.ndarray, y: np.ndarray, ridge: float = 1.0,
                     folds: int = 5) -> float:
    """Share of the variance of a reward y [N, m] between a record's responses that a ridge
    regression on features x [N, m, D] predicts out of fold (records dealt into `folds`):
    how much of a true reward a linear reward on x can carry. Within records, because
    Plackett-Luce sees only differences between a record's responses; padded responses
    (mask 0) take no part."""
    n, m = mask.shape
    xc, yc = record_centred(x, mask), record_centred(y, mask)
    keep = mask.reshape(-1) > 0
    xs, ys = xc.reshape(n * m, -1)[keep], yc.reshape(-1)[keep]
    fold = np.repeat(np.arange(n) % folds, m)[keep]
    pred = np.zeros_like(ys)
    for f in range(folds):
        tr, te = fold != f, fold == f
        coef = np.linalg.solve(xs[tr].T @ xs[tr] + ridge * np.eye(xs.shape[1]), xs[tr].T @ ys[tr])
        pred[te] = xs[te] @ coef
    return float(1.0 - ((ys - pred) ** 2).sum() / (ys ** 2).sum())


def policy_rewards(rd: RunDir, cfg, records, k: int) -> np.ndarray:
    """Implicit rewards [N, m, K] of every response (ranked order) under every policy."""
    import torch

    from emdpo_ray.data.encode import encode
    from emdpo_ray.models.scoring import pair_logps

    tok, bank = rd.load_bank(cfg, rd.policy_dirs(k))
    enc = encode(records, tok, cfg.data)
    arrays = enc.arrays()
    n, m = enc.resp_mask.shape
    out = np.zeros((n, m, k))
    per = max(1, 256 // (m * (k + 1)))
    with torch.no_grad():
        for s in range(0, n, per):
            idx = np.arange(s, min(n, s + per))
            pairs = np.array([(i, j) for i in idx for j in list(range(k)) + [-1]])
            lp, _, _ = pair_logps(bank.logps, arrays, pairs, torch.device("cpu"))
            lp = lp.double().numpy().reshape(len(idx), k + 1, m)
            out[idx] = cfg.dpo.beta * (lp[:, :k] - lp[:, k:]).transpose(0, 2, 1)
    return out, enc.resp_mask


def generations_report(rd: RunDir, data_path: str, match: np.ndarray, k: int) -> dict | None:
    """report/generations.py on MMRA's samples, when the data has its synthetic sidecar."""
    from emdpo_ray.data import synth
    from emdpo_ray.report.generations import generation_eval, regret_fidelity

    meta_file = synth.meta_path(data_path)
    samples = rd.mmra_samples()
    if not os.path.exists(meta_file) or samples is None:
        return None
    mixtures = {"mmra": np.asarray(rd.mmra_weights()), "uniform": np.full(k, 1.0 / k),
                "eta": np.asarray(rd.mixing_weights()),
                **{f"policy_{j}": np.eye(k)[j] for j in range(k)}}
    out = generation_eval(samples, read_json(meta_file), match, k, mixtures,
                          seed=rd.config().seed)
    mm = rd.mmra() or {}
    out["prompt_source"] = mm.get("prompt_source")
    if "L" in mm:
        out["regret_fidelity"] = regret_fidelity(mm["L"], out["reward"], match)
    return out


def online_eval(rd: RunDir, data_path: str, match: np.ndarray, users_per_type: int = 12,
                max_feedbacks: int = 12) -> dict | None:
    """Feedbacks a new user needs before being routed to their true type, per type,
    for ternary rankings and for binary comparisons (synthetic data with its meta file).

    Each simulated user sends rankings sampled from their true type's reward; after each,
    the posterior is updated by Bayes' rule from eta (as the server does). The count is the
    first n from which the user is routed (MAP, confident) to the matched learned type;
    `max_feedbacks + 1` when that never happens.
    """
    import torch

    from emdpo_ray.data import synth
    from emdpo_ray.core.estep import bayes_update, entropy
    from emdpo_ray.core.losses import plackett_luce_logp
    from emdpo_ray.data.records import parse_record

    meta_file = synth.meta_path(data_path)
    if not os.path.exists(meta_file):
        return None
    meta = read_json(meta_file)
    theta = np.asarray(meta["theta"])
    cfg = rd.config()
    log_eta = np.log(np.clip(np.asarray(rd.mixing_weights()), 1e-300, None))
    k = len(log_eta)
    rng = np.random.default_rng(cfg.seed + 555)
    out = {}
    for label, m in (("ternary", 3), ("binary", 2)):
        per_type = []
        for t in range(len(theta)):
            if match[t] < 0:
                per_type.append(None)
                continue
            recs = []
            for u in range(users_per_type):
                recs += synth.user_records(rng, theta, meta["reward_scale"], t, f"sim{u}",
                                           max_feedbacks, m, meta.get("family", "linear"))
            parsed = [parse_record(r, f"sim:{i}") for i, r in enumerate(recs)]
            rewards, mask = policy_rewards(rd, cfg, parsed, k)
            rewards = rewards * rd.reward_temperature()  # as the server scores feedback
            ll = torch.stack([plackett_luce_logp(torch.as_tensor(rewards[:, :, j]),
                                                 torch.as_tensor(mask)) for j in range(k)], 1)
            ll = ll.double().numpy().reshape(users_per_type, max_feedbacks, k)
            needed = []
            for u in range(users_per_type):
                post, first = log_eta, max_feedbacks + 1
                for n in range(max_feedbacks):
                    post = bayes_update(post, ll[u, n])
                    routed = (np.argmax(post) == match[t]
                              and entropy(post) <= cfg.serve.min_confidence)
                    if routed and first > max_feedbacks:
                        first = n + 1
                    elif not routed:
                        first = max_feedbacks + 1
                needed.append(first)
            per_type.append(float(np.mean(needed)))
        out[label] = {"feedbacks_to_true_type": per_type}
    out["max_feedbacks"] = max_feedbacks
    return out


def evaluate_run(run: RunDir | str, data_path: str, online: bool = False) -> dict:
    from sklearn.metrics import adjusted_rand_score

    rd = RunDir.open(run) if isinstance(run, str) else run
    rd.require_finished()
    cfg = rd.config()
    records = load_records(data_path, cfg.data.user_field)
    post = {u: np.asarray(p) for u, p in rd.posteriors().items()}
    k = len(next(iter(post.values())))
    out: dict = {"records": len(records), "types": k}
    known = [r for r in records if r.user_id in post]
    out["unknown_users"] = len({r.user_id for r in records} - set(post))
    if not known or any(r.true_type is None for r in known):
        rd.write_eval(out)
        return out
    users = sorted({r.user_id for r in known})
    tt = {r.user_id: r.true_type for r in known}
    true_types = np.array([tt[u] for u in users])
    gamma = np.stack([post[u] for u in users])
    out["ari"] = float(adjusted_rand_score(true_types, gamma.argmax(1)))
    k_true = int(true_types.max()) + 1
    match = match_types(true_types, gamma, k_true)
    rewards, mask = policy_rewards(rd, cfg, known, k)
    acc = []
    for t in range(k_true):
        rows = [i for i, r in enumerate(known) if r.true_type == t]
        if match[t] < 0 or not rows:
            acc.append(None)
            continue
        r = rewards[rows, :, match[t]]
        pairs = mask[rows][:, 1:]
        right = (r[:, :-1] > r[:, 1:]) & pairs
        acc.append(float(right.sum() / max(pairs.sum(), 1)))
    out["type_accuracy"] = acc
    out["match"] = match.tolist()
    eta = np.asarray(rd.mixing_weights())
    out["eta"] = [float(eta[j]) if j >= 0 else 0.0 for j in match]
    out["true_shares"] = (np.bincount(true_types, minlength=k_true) / len(users)).tolist()
    gen = generations_report(rd, data_path, match, k)
    if gen is not None:
        out["true_regret"] = gen.pop("true_regret")
        out["generations"] = gen
        from emdpo_ray.report.plots import plot_rewards

        plot_rewards(rd.plots_dir, gen)
    if online:
        on = online_eval(rd, data_path, match)
        if on is not None:
            out["online"] = on
    rd.write_eval(out)
    return out
