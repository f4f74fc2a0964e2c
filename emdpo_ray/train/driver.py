"""The EM driver: `emdpo-ray train --data data.jsonl --types 3 --out runs/demo`.

    records -> tokenize -> reference log-probs (Ray tasks, cached) -> initial posteriors
    loop: M-step (the resident worker group: all policies) -> scores -> E-step -> state
    -> policies/type_k, posteriors.jsonl, history.json, plots, mmra.json

A SIGKILL at any moment loses at most the iteration in flight: `state.json` is written
atomically after each E-step and the same command resumes from it.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from emdpo_ray.config import Config
from emdpo_ray.core.calibration import (crossfit_temperature, fit_temperature, ranking_loglik,
                                        types_temperature)
from emdpo_ray.core.estep import (EStep, converged, e_step, loglik_drop, per_ranking_interval,
                                   predictive_user_logliks, reference_loglik)
from emdpo_ray.data.records import Record
from emdpo_ray.data.sources import load_records
from emdpo_ray.run.rundir import RunDir, RunDirError, type_name
from emdpo_ray.run.storage import checkpoint_from
from emdpo_ray.train.num_types import choose_num_types
from emdpo_ray.train.prepare import prepare_data
from emdpo_ray.train.sft import sft_plans
from emdpo_ray.train.start import (COUNTS_ONLY, HELDOUT_PER_USER, feature_candidates,
                                   heldout_records, initial_gamma)
from emdpo_ray.utils import fault_point

log = logging.getLogger(__name__)

__all__ = ["train", "RunDirError"]

def policy_names(k: int, cross_fit: bool) -> list[str]:
    """Policies trained per M-step: type_k on everyone, plus f<f>_type_k without fold f."""
    names = [type_name(j) for j in range(k)]
    if cross_fit:
        names += [f"f{f}_{type_name(j)}" for f in (0, 1) for j in range(k)]
    return names


def record_weights(gamma_rec: np.ndarray, fold_rec: np.ndarray | None):
    """Record weights [N, A] for the policies of `policy_names` and which (record, policy)
    scores the E-step needs [N, A]. With cross-fitting (`fold_rec` given), policy f_type_k
    trains without fold f and scores only fold f."""
    cols, need = [gamma_rec], [np.zeros_like(gamma_rec, dtype=bool)]
    if fold_rec is None:
        need[0][:] = True
    else:
        k = gamma_rec.shape[1]
        for f in (0, 1):
            out_of_fold = (fold_rec != f)[:, None]
            cols.append(gamma_rec * out_of_fold)
            need.append(np.repeat(~out_of_fold, k, axis=1))
    return np.concatenate(cols, 1), np.concatenate(need, 1)


def type_scores(scores: np.ndarray, k: int, fold_rec: np.ndarray | None) -> np.ndarray:
    """[N, K, ...] per-record scores (log-likelihoods, or rewards [N, K, m]) for the E-step
    from those of every policy [N, A, ...] (out of fold when cross-fitting)."""
    if fold_rec is None:
        return scores[:, :k]
    f = fold_rec.reshape(-1, *[1] * (scores.ndim - 1))
    return np.where(f == 0, scores[:, k:2 * k], scores[:, 2 * k:3 * k])


def ari(true_types: np.ndarray | None, gamma: np.ndarray) -> float | None:
    if true_types is None:
        return None
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(true_types, gamma.argmax(1)))


def user_true_types(records: list[Record], user_index: np.ndarray, num_users: int):
    if any(r.true_type is None for r in records):
        return None
    out = np.zeros(num_users, dtype=int)
    out[user_index] = [r.true_type for r in records]
    return out


def warn_if_loglik_fell(prev: EStep | None, cur: EStep, it: int, say,
                        scales: tuple[float, float] = (1.0, 1.0)) -> float | None:
    """Log (and say) a fall of the log-likelihood between iterations; returns it. `scales`:
    the reward temperatures the two were scored at (em.reward_temperature=fit)."""
    drop = loglik_drop(prev, cur)
    if drop is not None:
        why = ("exact EM never does: the M-step fit the policies only approximately"
               if scales[0] == scales[1] else
               f"the rewards' scale changed too (x{scales[0]:.3g} -> x{scales[1]:.3g}), so "
               "the two figures are of different models")
        msg = (f"iter {it}: log-likelihood fell by {drop:.3g} nats ({prev.loglik:.2f} -> "
               f"{cur.loglik:.2f}); {why}")
        log.warning(msg)
        say("warning: " + msg)
    return drop


def reward_temperature(cfg: Config, rewards: np.ndarray, held: np.ndarray | None,
                       user_index: np.ndarray, num_users: int, eta: np.ndarray) -> float:
    """The scale of the policies' rewards [N, K, m] for this iteration's E-step
    (`em.reward_temperature`): fixed, or fitted on the held-out rankings (1 without them)."""
    t = cfg.em.reward_temperature
    if t != "fit":
        return float(t)
    return 1.0 if held is None else fit_temperature(rewards, held, user_index, num_users, eta)


def guard_check(rewards: np.ndarray, held: np.ndarray, user_index: np.ndarray, num_users: int,
                eta: np.ndarray, baseline: np.ndarray | float | None, tau: float | str,
                level: float = 0.9) -> tuple[dict, np.ndarray]:
    """Do this iteration's policies (rewards [N, K, m]) predict the held-out rankings (from
    each user's other rankings) better than the model behind the current types, beyond
    noise? `baseline`: that model's held-out log-likelihood per user [U], or only per
    ranking (a run resumed from before the per-user figures were kept). Kept when the
    `level` interval of the gain per ranking, paired per user and resampling users, lies
    above 0 (level 0: any gain in the mean). With a fitted temperature (`tau="fit"`) each
    half of the users is scored at the one fitted on the other half. ({"heldout_loglik_per_
    ranking", "interval" (95%), "baseline", "gain", "gain_interval", "accepted",
    "temperatures"}, the figures per user [U])."""
    if tau == "fit":
        per_user, taus = crossfit_temperature(rewards, held, user_index, num_users, eta)
    else:
        taus = None
        per_user = predictive_user_logliks(ranking_loglik(rewards, float(tau)), held,
                                           user_index, num_users, eta)
    n = np.bincount(user_index[held], minlength=num_users)
    pred = float(per_user.sum() / held.sum())
    report = {"heldout_loglik_per_ranking": pred, "interval": per_ranking_interval(per_user, n),
              "baseline": None, "gain": None, "gain_interval": None, "accepted": True,
              "temperatures": taus}
    if baseline is not None and np.ndim(baseline) == 0:  # nothing to pair with
        report.update(baseline=float(baseline), gain=pred - float(baseline),
                      accepted=pred >= float(baseline))
    elif baseline is not None:
        gain = per_user - np.asarray(baseline, float)
        lo, hi = per_ranking_interval(gain, n, level=level) if level > 0 else [None, None]
        report.update(baseline=float(np.sum(baseline) / held.sum()),
                      gain=float(gain.sum() / held.sum()), gain_interval=[lo, hi],
                      accepted=bool(lo > 0 if level > 0 else gain.sum() >= 0))
    return report, per_user


def refusal(guard: dict, it: int) -> str:
    """Why the guard kept the current types, in words."""
    lo_hi = guard["gain_interval"] or [None, None]
    gain = (f", gain {guard['gain']:+.3f} [{lo_hi[0]:+.3f}, {lo_hi[1]:+.3f}]"
            if lo_hi[0] is not None else "")
    return (f"these policies do not predict held-out rankings better than "
            f"{'the start' if it == 1 else f'iteration {it - 1}'} did, beyond noise "
            f"({guard['heldout_loglik_per_ranking']:.3f} vs {guard['baseline']:.3f} per "
            f"ranking{gain})")


def waited(gather, timings: dict):
    """`gather` timed: `timings["init_features_wait_s"]` the seconds its (one) call waited."""
    def call():
        t = time.perf_counter()
        try:
            return gather()
        finally:
            timings["init_features_wait_s"] = time.perf_counter() - t
    return call


def run_identity(cfg: Config, data_path: str, k: int | str) -> dict:
    return {"data": data_path if "://" in data_path else os.path.abspath(data_path),
            "types": k, "config": cfg.model_dump(mode="json")}


def train(cfg: Config, data_path: str, k: int | str, run_dir: str, *, overwrite: bool = False,
          verbose: bool = False, progress=None, on_steps=None) -> dict:
    """Run EM-DPO end to end with `k` types, or `"auto"`: K chosen by the start's features
    (train/num_types.py); returns a summary (also written to the run directory).
    `progress(message)` narrates; `on_steps(phase, done, total, loss)` follows long phases."""
    records = load_records(data_path, cfg.data.user_field)  # all-or-nothing, before any write
    auto = k == "auto"
    if not auto and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"--types must be a whole number >= 1 or auto, got {k!r}")
    if auto and cfg.em.init == "labels":
        raise ValueError("--types auto chooses K from the start's features, em.init=labels "
                         "takes the types from the records' true_type: give --types")
    rd = RunDir(run_dir)
    resuming = rd.create_or_resume(run_identity(cfg, data_path, k), overwrite)
    state = rd.state() if resuming else None
    say = progress or (lambda msg: log.info(msg))
    rd.write_config(cfg)

    prep = prepare_data(cfg, records, rd, verbose, say, on_steps)
    ui, u_count, users = prep.index.user_index, len(prep.index.users), prep.index.users
    true_types = user_true_types(records, ui, u_count)
    fold = np.random.default_rng(cfg.seed + 17).permutation(u_count) % 2
    fold_rec = fold[ui] if cfg.em.cross_fit else None
    held = heldout_records(ui, cfg.em.guard_holdout, cfg.seed) if cfg.em.guard_holdout else None
    if held is not None and not held.any():
        held = None  # no user has two rankings: nothing to hold out
    t_start = time.perf_counter()
    features, start_info, candidates = None, {}, None
    start_wait: dict = {}  # the driver's wait for the workers' features, not hidden by its fits
    try:
        if state is not None:
            k = rd.load_log_gamma(state).shape[1]  # with --types auto, the K chosen at the start
        else:
            # the workers compute the reference's features while the driver fits the tokens'
            # (auto compares candidates only for k > 1: with one type nothing asks for them)
            wanted = cfg.em.init_features not in COUNTS_ONLY and (
                cfg.em.init_features != "auto" or auto or k > 1)
            if (cfg.em.init == "kmeans" or auto) and wanted:
                # a copy of the reference trained further gives the states (em.init_sft_epochs)
                sft = (sft_plans(cfg, prep.index.resp_mask, prep.sizes, cfg.start_sft_passes)
                       if cfg.start_sft_passes > 0 else (None, 0, 0.0))
                features = waited(prep.group.response_features(
                    *sft, seed=cfg.seed,
                    end_ids=prep.sentence_ends if cfg.em.init_pooling == "sentences" else None),
                    start_wait)
                start_info["features_sft"] = {"epochs": cfg.start_sft_passes, "steps": sft[1]}
            if auto:
                # built once: the start below reuses them at the K chosen
                candidates = feature_candidates(cfg.em.init_features, records, ui, u_count,
                                                features)
                start_info["types"] = choose_num_types(cfg, *candidates, ui, u_count, held)
                k = start_info["types"]["chosen_types"]
                say(f"types: K={k}, grown on {start_info['types']['features']} features up to "
                    f"{cfg.em.max_types} while one more type predicted held-out rankings "
                    "better beyond noise")
    except BaseException:
        prep.close()
        raise
    names = policy_names(k, cfg.em.cross_fit)

    def mstep(gamma: np.ndarray, it: int, init_from, tag: str, final: bool = False):
        w, need = record_weights(gamma[ui], fold_rec)
        run_names = names
        if final:  # every ranking, nothing to score, the served policies only (not the folds')
            run_names, w, need = names[:k], w[:, :k], np.zeros_like(need[:, :k])
        elif held is not None:
            w[held] = 0.0  # the guard's rankings: scored, never trained on
        phase = "final fit" if final else f"M-step {it}"
        steps = (lambda d, t, loss: on_steps(phase, d, t, loss)) if on_steps else None
        epochs = (cfg.em.final_epochs if final else
                  cfg.em.warm_epochs if init_from is not None else cfg.dpo.epochs)
        return prep.run_mstep(names=run_names, num_types=k, weights=w, score_mask=need,
                              run_name=f"{tag}-{it:03d}-{time.time_ns()}",
                              seed=cfg.seed * 100003 + it, init_from=init_from,
                              epochs=epochs, on_steps=steps)

    try:
        history: list[dict] = []
        if state is not None:
            log_gamma = rd.load_log_gamma(state)
            gamma = np.exp(log_gamma)
            eta, it0 = np.asarray(state["eta"]), state["iteration"] + 1
            prev = EStep(log_gamma, eta, state["loglik"])
            ckpt = checkpoint_from(state["checkpoint"])
            baseline = rd.load_heldout_per_user(state)
            if baseline is None:  # a run from before the per-user figures were kept
                baseline = state.get("heldout_loglik_per_ranking")
            # history.json is written before state.json: after a crash between the two it holds
            # the iteration in flight, which is redone, so drop it rather than count it twice.
            history = [h for h in rd.history() if h["iteration"] <= state["iteration"]]
            prev_tau = history[-1].get("reward_temperature", 1.0) if history else 1.0
            done = state.get("converged", False)
            final_fit = state.get("final_fit")
            say(f"resuming after iteration {state['iteration']}"
                + (" and the final fit" if final_fit else ""))
        else:
            def restart(g, r):
                res = mstep(g, 0, None, f"restart{r}")
                return e_step(type_scores(res.scores(), k, fold_rec), ui, u_count,
                              g.mean(0)).loglik

            gamma = initial_gamma(cfg, k, records, ui, u_count, restart, features, start_info,
                                  held, candidates)
            baseline = start_info.pop(HELDOUT_PER_USER, None)  # never into history.json
            baseline = baseline if held is not None else None
            with np.errstate(divide="ignore"):
                log_gamma = np.log(gamma)
            eta, it0, prev, ckpt, done, final_fit = gamma.mean(0), 1, None, None, False, None
            prev_tau = 1.0
            a = ari(true_types, gamma)
            # Iteration 0: the start. Every policy is still the reference (rewards 0), so the
            # mixture's log-likelihood is that of uniformly random rankings.
            ll0 = e_step(np.repeat(reference_loglik(prep.index.resp_mask)[:, None], k, 1), ui,
                         u_count, eta).loglik
            history.append({"iteration": 0, "init": cfg.em.init, "start": start_info,
                            "log_likelihood": ll0,
                            "mixing_weights": eta.tolist(), "ari": a,
                            "timings": {**(prep.timings or {}), **start_wait,
                                        "init_s": time.perf_counter() - t_start}})
            chose = (f", {start_info['features']} features, L2 {start_info['l2']:g}"
                     if "features" in start_info else "")
            say(f"init ({cfg.em.init}{chose}): eta={np.round(eta, 3).tolist()}"
                + (f" ari={a:.3f}" if a is not None else "") + f" ({time.perf_counter() - t_start:.1f}s)")

        for it in range(it0, cfg.em.max_iterations + 1):
            if done:
                break
            say(f"iter {it}: M-step")
            res = mstep(gamma, it, ckpt if cfg.em.warm_start else None, "mstep")
            fault_point("estep", it)
            t = time.perf_counter()
            rewards = type_scores(res.rewards, k, fold_rec)
            tau = reward_temperature(cfg, rewards, held, ui, u_count, eta)
            cur = e_step(ranking_loglik(rewards, tau), ui, u_count, eta)
            t_e = time.perf_counter() - t
            d_gamma = float(np.abs(cur.gamma - gamma).max())
            drop = warn_if_loglik_fell(prev, cur, it, say, (prev_tau, tau))
            done = converged(prev, cur, cfg.em.tol_loglik, cfg.em.tol_posterior)
            guard = None
            if held is not None:
                guard, per_user = guard_check(rewards, held, ui, u_count, eta, baseline,
                                              cfg.em.reward_temperature, cfg.em.guard_level)
            if guard is None or guard["accepted"]:
                gamma, log_gamma, eta, prev, prev_tau = cur.gamma, cur.log_gamma, cur.eta, cur, tau
                baseline = per_user if guard else None
            else:  # keep the current types; this M-step's policies were trained on them
                done, d_gamma = True, 0.0
                say(f"iter {it}: {refusal(guard, it)}: keeping the current types and stopping")
            ckpt = res.checkpoint
            a = ari(true_types, gamma)
            m = res.metrics
            history.append({
                "iteration": it, "log_likelihood": cur.loglik, "reward_temperature": tau,
                "mixing_weights": eta.tolist(),
                "max_delta_gamma": d_gamma, "ari": a, "loglik_drop": drop, "guard": guard,
                "worker_failures": res.worker_failures,
                "timings": {"fit_wall_s": res.wall_s, "startup_s": m.get("time/startup_s"),
                            "train_s": m.get("time/train_s"), "score_s": m.get("time/score_s"),
                            "estep_s": t_e},
                "metrics": {key: v for key, v in m.items() if "/" in key and not key.startswith("time/")},
            })
            rd.save_iteration(it, log_gamma, history,
                              {"eta": eta.tolist(), "loglik": cur.loglik, "converged": done,
                               "heldout_loglik_per_ranking": None if guard is None else guard[
                                   "heldout_loglik_per_ranking" if guard["accepted"] else "baseline"],
                               "checkpoint": rd.store.checkpoint_uri(ckpt)},
                              heldout_per_user=baseline if np.ndim(baseline) else None,
                              before_state=lambda: fault_point("checkpoint", it))
            say(f"iter {it}: loglik={cur.loglik:.2f} "
                + (f"(rewards x{tau:.3g}) " if tau != 1.0 else "")
                + f"eta={np.round(eta, 3).tolist()} "
                f"max|dgamma|={d_gamma:.3g}" + (f" ari={a:.3f}" if a is not None else "")
                + f" (fit {res.wall_s:.1f}s)")
        if cfg.em.final_epochs > 0 and final_fit is None:
            last = history[-1]["iteration"]
            say(f"final fit: {cfg.em.final_epochs:g} epochs on the final types, every ranking")
            res = mstep(gamma, last + 1, ckpt, "final", final=True)
            ckpt = res.checkpoint
            final_fit = {"after_iteration": last, "epochs": cfg.em.final_epochs,
                         "fit_wall_s": res.wall_s, "worker_failures": res.worker_failures,
                         "metrics": {key: v for key, v in res.metrics.items()
                                     if "/" in key and not key.startswith("time/")}}
            # same iteration and posteriors; the state now points at the final policies
            rd.save_iteration(last, log_gamma, history,
                              {**rd.state(), "checkpoint": rd.store.checkpoint_uri(ckpt),
                               "final_fit": final_fit},
                              before_state=lambda: fault_point("final_fit", last))
            say(f"final fit: done ({res.wall_s:.1f}s)")
    finally:
        prep.close()  # the workers' CPUs go back before MMRA's tasks need them

    summary = finalize(rd, records, users, log_gamma, eta, history, ckpt, true_types,
                       final_fit)
    rd.push_all()
    if cfg.mmra.enabled:
        from emdpo_ray.train.mmra_run import run_mmra

        summary["mmra"] = run_mmra(rd, cfg=cfg, progress=say)
        rd.push_all()
    return summary


def finalize(rd: RunDir, records, users, log_gamma, eta, history, ckpt, true_types,
             final_fit: dict | None = None) -> dict:
    """Contract outputs: policies/type_k, posteriors.jsonl, plots, summary.json."""
    gamma = np.exp(log_gamma)
    k = gamma.shape[1]
    with ckpt.as_directory() as d:
        rd.install_policies(d, [type_name(j) for j in range(k)])
    rd.write_posteriors(users, log_gamma)
    summary = {"types": k, "users": len(users), "records": len(records),
               "iterations": sum(h["iteration"] > 0 for h in history),
               "mixing_weights": eta.tolist(),
               "log_likelihood": history[-1]["log_likelihood"] if history else None,
               "reward_temperature": types_temperature(history),
               "ari": ari(true_types, gamma), "final_fit": final_fit}
    rd.write_summary(summary)
    from emdpo_ray.report.plots import plot_run

    plot_run(rd.plots_dir, history, gamma, true_types)
    return summary
