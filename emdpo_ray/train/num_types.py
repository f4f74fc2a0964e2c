"""How many types? Held-out likelihood of the start's linear mixture as K grows from 1
(`emdpo-ray types`).

For K = 1, 2, ..., up to a maximum: the linear Plackett-Luce mixture of the start
(train/linear_mixture.py) is fitted without a fifth of every user's rankings, from restarts
of which the first is the previous K's split with its worst-fitting type cut in two (growing
by splits; the others are random partitions), its L2 strength chosen down `em.init_l2` as the
start chooses it; each K is scored by how well it predicts every user's held-out rankings
from the user's other ones. K grows while one more type raises that by more than noise: the
95% interval of the gain, paired per user (users resampled), lies above zero (above 1e-3
nats per ranking: a fit whose extra type is empty scores the same up to rounding).

It sees what its features see. Token counts cannot express a preference that depends on
the order of the words, nor one that flips with the prompt unless words of the prompt recur
in the responses; where they see no difference between users K = 1 says only that, and a
model's states (`--model`) are the features to ask.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from emdpo_ray.config import ConfigError
from emdpo_ray.core.estep import per_ranking_interval, smoothed_onehot
from emdpo_ray.train.linear_mixture import (LinearMixture, feature_start, l2_path,
                                            preference_embeddings, record_logliks, split_type,
                                            type_fit)
from emdpo_ray.train.start import predictive_user_logliks, simplest_within_noise


def worst_fitting_type(x: np.ndarray, mask: np.ndarray, user_index: np.ndarray,
                       mix: LinearMixture) -> int:
    """The type with at least two users whose users' rankings it fits worst (type_fit; the
    largest type when none has two)."""
    users = np.bincount(mix.gamma.argmax(1), minlength=mix.gamma.shape[1])
    if users.max() < 2:
        return int(users.argmax())
    return int(np.argmin(np.where(users >= 2, type_fit(x, mask, user_index, mix), np.inf)))


# Gains below this (nats per held-out ranking) are numerical: a fit whose extra type is
# empty or a copy of another scores the same up to rounding.
MIN_GAIN = 1e-3


def growth_choice(gain_intervals: list[list[float] | None], min_gain: float = MIN_GAIN) -> int:
    """K chosen from the gain intervals of K = 1, 2, ... (None for K = 1): the last K before
    the first one whose gain's interval reaches `min_gain`."""
    k = 1
    for kk, interval in enumerate(gain_intervals[1:], start=2):
        if interval is None or interval[0] <= min_gain:
            break
        k = kk
    return k


def grow_types(x: np.ndarray, mask: np.ndarray, user_index: np.ndarray, num_users: int,
               max_types: int, held: np.ndarray, seed: int = 0, restarts: int = 8,
               l2s: tuple[float, ...] = (1e-2,), iterations: int = 20,
               level: float = 0.95, until_chosen: bool = False,
               ) -> tuple[int, list[dict], dict[int, np.ndarray], dict[int, np.ndarray]]:
    """(chosen K, one row per K, {K: hard labels [U] of the fit on every ranking}, {K: each
    user's held-out log-likelihood [U]}). A row: K, the L2 chosen, held-out log-likelihood
    per held-out ranking with its interval, its gain over K - 1 with the interval, and the
    type shares. `until_chosen`: stop at the first K that gains nothing (the choice is then
    made) and fit no labels: what `train --types auto` needs, not the full table."""
    keep = ~held
    n_held = np.bincount(user_index[held], minlength=num_users)
    per_ranking = max(int(held.sum()), 1)
    emb = preference_embeddings(x, mask, user_index, num_users)
    l2s = tuple(sorted(l2s, reverse=True))
    rows: list[dict] = []
    labels: dict[int, np.ndarray] = {}
    held_user: dict[int, np.ndarray] = {}
    prev_user, prev_fit = None, None
    for k in range(1, max_types + 1):
        gamma0 = None
        if prev_fit is not None:
            s = worst_fitting_type(x[keep], mask[keep], user_index[keep], prev_fit)
            gamma0 = smoothed_onehot(split_type(prev_fit.gamma.argmax(1), emb, s, k - 1, seed),
                                     k, 0.05)
        mix = feature_start(x[keep], mask[keep], user_index[keep], num_users, k, seed,
                            iterations, restarts if k > 1 else 1, l2s[0], gamma=gamma0)
        path = l2_path(x[keep], mask[keep], user_index[keep], num_users, mix, list(l2s),
                       iterations)
        per_user = {l2: predictive_user_logliks(record_logliks(x, mask, m.theta), held,
                                                user_index, num_users, m.eta)
                    for l2, m in zip(l2s, path)}
        l2 = simplest_within_noise(per_user, n_held, seed=seed)
        fit = path[l2s.index(l2)]
        row = {"types": k, "l2": l2,
               "heldout_loglik_per_ranking": float(per_user[l2].sum() / per_ranking),
               "heldout_interval": per_ranking_interval(per_user[l2], n_held, seed=seed,
                                                        level=level),
               "gain_per_ranking": None, "gain_interval": None,
               "shares": np.round(fit.gamma.mean(0), 3).tolist()}
        if prev_user is not None:
            gain = per_user[l2] - prev_user
            row["gain_per_ranking"] = float(gain.sum() / per_ranking)
            row["gain_interval"] = per_ranking_interval(gain, n_held, seed=seed, level=level)
        rows.append(row)
        held_user[k] = per_user[l2]
        if until_chosen:
            if growth_choice([r["gain_interval"] for r in rows]) < k:
                break
        else:  # the types on every ranking, from the held-out fit's split
            labels[k] = feature_start(x, mask, user_index, num_users, k, seed, iterations,
                                      l2=l2, gamma=fit.gamma).gamma.argmax(1)
        prev_user, prev_fit = per_user[l2], fit
    return growth_choice([r["gain_interval"] for r in rows]), rows, labels, held_user


def types_across_features(candidates: dict[str, Callable[[], np.ndarray]], mask: np.ndarray,
                          user_index: np.ndarray, num_users: int, max_types: int,
                          held: np.ndarray, seed: int = 0, restarts: int = 8,
                          l2s: tuple[float, ...] = (1e-2,), iterations: int = 20) -> dict:
    """K grown on each candidate feature set (grow_types; candidates simplest first), and
    the candidate whose chosen K predicts the held-out rankings best, or the simplest within
    noise of it (simplest_within_noise, as the start chooses its features): a blind feature
    set stops at K = 1, so taking the largest K would trust any candidate that overfits.
    {"chosen_types", "features", "candidates": {name: {"chosen_types", "rows"}}}."""
    per_user: dict[str, np.ndarray] = {}
    report: dict[str, dict] = {}
    for name, make in candidates.items():
        k, rows, _, held_user = grow_types(make(), mask, user_index, num_users, max_types,
                                           held, seed, restarts, l2s, iterations,
                                           until_chosen=True)
        report[name] = {"chosen_types": k, "rows": rows}
        per_user[name] = held_user[k]
    chosen = simplest_within_noise(per_user, np.bincount(user_index[held], minlength=num_users),
                                   seed=seed)
    return {"chosen_types": report[chosen]["chosen_types"], "features": chosen,
            "candidates": report}


def choose_num_types(cfg, candidates: dict[str, Callable[[], np.ndarray]], mask: np.ndarray,
                     user_index: np.ndarray, num_users: int,
                     held: np.ndarray | None = None) -> dict:
    """`train --types auto`: types_across_features on the start's candidates
    (train/start.py's feature_candidates for `em.init_features`), up to `em.max_types`,
    scored on `held` (by default a fifth of each user's rankings)."""
    from emdpo_ray.train.start import heldout_records

    if held is None or not held.any():
        held = heldout_records(user_index, 0.2, cfg.seed)
    if not held.any():
        raise ConfigError("--types auto: no user has two rankings, so no K can be tested on "
                          "held-out rankings; give --types")
    return types_across_features(candidates, mask, user_index, num_users, cfg.em.max_types,
                                 held, cfg.seed, cfg.em.init_restarts, cfg.start_l2s,
                                 max(cfg.em.init_refine_iterations, 1))


def model_states(records, model_path: str, cfg):
    """A model's Representations (models/features.py: em.init_layers' states pooled by part
    [N, m, D], in the records' ranked order, and the prompts' last states [N, P]): the
    reference's own, not the further-trained copy's."""
    import torch

    from emdpo_ray.data.encode import encode
    from emdpo_ray.models.features import reference_representations, sentence_end_ids
    from emdpo_ray.models.loading import load_base, load_tokenizer
    from emdpo_ray.models.sources import resolve_named_model

    path = resolve_named_model(cfg.model.model_copy(update={"name_or_path": model_path}))
    tok, model = load_tokenizer(path, cfg.model), load_base(path, cfg.model).eval()
    ends = sentence_end_ids(tok) if cfg.em.init_pooling == "sentences" else None
    return reference_representations(model, encode(records, tok, cfg.data).arrays(),
                                     torch.device("cpu"), layers=cfg.start_layers, end_ids=ends)


def types_report(records, cfg, max_types: int, model_path: str | None = None,
                 holdout: float = 0.2, features: str = "tokens") -> dict:
    """`emdpo-ray types`: grow_types on the records' token counts (`features="tokens"`), the
    counts crossed with the prompt (`"tokens_by_prompt"`, train/context_features.py),
    `model_path`'s states, or the counts crossed with `model_path`'s reading of the prompt
    (`"tokens_by_prompt_state"`); ARI against `true_type` per K where every record has one."""
    from sklearn.metrics import adjusted_rand_score

    from emdpo_ray.data.encode import index_records
    from emdpo_ray.train.start import feature_candidates, heldout_records

    if max_types < 1:
        raise ConfigError(f"--max-types must be >= 1, got {max_types}")
    if not 0 < holdout < 1:
        raise ConfigError(f"--holdout must be between 0 and 1, got {holdout}")
    if features not in ("tokens", "tokens_by_prompt", "tokens_by_prompt_state"):
        raise ConfigError("--features must be tokens, tokens_by_prompt or "
                          f"tokens_by_prompt_state, got {features!r}")
    if model_path is not None and features == "tokens_by_prompt":
        raise ConfigError("--model gives the features itself: drop --features")
    if model_path is None and features == "tokens_by_prompt_state":
        raise ConfigError("--features tokens_by_prompt_state reads the prompts with a model: "
                          "give --model")
    idx = index_records(records)
    ui, num_users = idx.user_index, len(idx.users)
    held = heldout_records(ui, holdout, cfg.seed)
    if not held.any():
        raise ConfigError("no user has two rankings: nothing to hold out, so no K can be tested")
    name = "reference" if model_path is not None and features == "tokens" else features
    candidates, mask = feature_candidates(
        name, records, ui, num_users,
        None if model_path is None else lambda: model_states(records, model_path, cfg))
    x = candidates[name]()
    chosen, rows, labels, _ = grow_types(x, mask, ui, num_users, max_types, held, cfg.seed,
                                      cfg.em.init_restarts, cfg.start_l2s,
                                      max(cfg.em.init_refine_iterations, 1))
    if all(r.true_type is not None for r in records):
        truth = np.zeros(num_users, int)
        truth[ui] = [r.true_type for r in records]
        for row in rows:
            row["ari"] = float(adjusted_rand_score(truth, labels[row["types"]]))
    return {"chosen_types": chosen, "features": features if model_path is None else
            f"states of {model_path}" if features == "tokens" else f"{features} of {model_path}",
            "users": num_users, "rankings": len(records),
            "heldout_rankings": int(held.sum()), "rows": rows}
