"""The EM driver: `emdpo-ray train --data data.jsonl --types 3 --out runs/demo`.

    records -> tokenize -> reference log-probs (Ray tasks, cached) -> initial posteriors
    loop: M-step (one Ray Train fit: all policies) -> scores -> E-step -> state on disk
    -> policies/type_k, posteriors.jsonl, history.json, plots, mmra.json

A SIGKILL at any moment loses at most the iteration in flight: `state.json` is written
atomically after each E-step and the same command resumes from it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np

from emdpo_ray.config import Config, config_to_yaml
from emdpo_ray.data import encode, fingerprint, shard_indices
from emdpo_ray.estep import EStep, converged, e_step, smoothed_onehot
from emdpo_ray.records import Record, load_records
from emdpo_ray.utils import atomic_save_npy, atomic_write_json, atomic_write_text, read_json

log = logging.getLogger(__name__)


FAULT_ENV = "EMDPO_FAULT"


def fault_point(name: str, iteration: int) -> None:
    """Crash testing: EMDPO_FAULT=<name>:<iteration> SIGKILLs this process here, mid-way
    through a phase too short to hit from outside (the E-step, the state write)."""
    if os.environ.get(FAULT_ENV) == f"{name}:{iteration}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class RunDirError(ValueError):
    """The run directory holds another run (different config or data)."""


def ensure_ray(cfg: Config, verbose: bool = False):
    import ray

    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        kw = {"log_to_driver": verbose}
        if not verbose:
            kw["logging_level"] = logging.ERROR
        if not address:
            # The dashboard serves the job API (submit = run code): loopback only.
            kw.update(include_dashboard=cfg.ray.dashboard, dashboard_host="127.0.0.1")
        # Without an address: a fresh in-process local Ray, never a stray `ray start`
        # cluster found on the machine. Inside a Ray job RAY_ADDRESS names the cluster.
        ray.init(address=address or "local", **kw)
    return ray


def worker_threads(cfg: Config) -> int:
    import ray

    cpus = int(ray.available_resources().get("CPU", 1))
    return max(1, min(cfg.ray.cpus_per_worker, cpus // cfg.ray.num_workers or 1))


def resolve_base(cfg: Config, records: list[Record], run_dir: str) -> str:
    """Path (or hub id) of the base model; builds the default tiny model once per run."""
    if cfg.model.name_or_path:
        from emdpo_ray.models import check_model_safety

        check_model_safety(cfg.model.name_or_path, cfg.model)  # refuse before any worker loads it
        # Names and hub ids are resolved on each node where they are loaded (models._local).
        return cfg.model.name_or_path
    from emdpo_ray.models import build_tiny_model

    path = os.path.join(run_dir, "base_model")
    if not os.path.isdir(path):
        texts = [t for r in records for t in (r.prompt, *r.responses)]
        build_tiny_model(texts, path, cfg.model, cfg.seed)
    return path


def reference_cache(run_dir: str, key: str, compute) -> tuple[np.ndarray, bool]:
    """Reference log-probs keyed by fingerprint; returns (array, cache_hit)."""
    path = os.path.join(run_dir, "cache", f"ref_logps-{key}.npy")
    if os.path.exists(path):
        return np.load(path), True
    arr = compute()
    atomic_save_npy(path, arr)
    return arr, False


def _ref_task(base_path: str, model_cfg: dict, arrays: dict, threads: int) -> np.ndarray:
    import torch

    from emdpo_ray.config import ModelConfig
    from emdpo_ray.models import load_base, sequence_logps
    from emdpo_ray.mstep import reference_logps

    torch.set_num_threads(threads)
    base = load_base(base_path, ModelConfig.model_validate(model_cfg)).eval()

    def forward(input_ids, attention_mask, loss_mask, policy):
        return sequence_logps(base, input_ids, attention_mask, loss_mask)

    return reference_logps(forward, arrays, torch.device("cpu"))


def compute_reference(cfg: Config, base_path: str, shards: list[dict], threads: int) -> np.ndarray:
    """Reference log-probs [N, m], the shards scored in parallel as Ray tasks."""
    import ray

    task = ray.remote(num_cpus=threads)(_ref_task)
    refs = [task.remote(base_path, cfg.model.model_dump(mode="json"), ray.put(s), threads)
            for s in shards]
    return np.concatenate(ray.get(refs))


@dataclass
class Prepared:
    base_path: str
    enc: object
    shard_refs: list
    sizes: list[int]
    threads: int


def prepare_data(cfg: Config, records: list[Record], run_dir: str, verbose: bool, say,
                 store=None) -> Prepared:
    """Base model, token arrays, cached reference log-probs, shards in the object store."""
    ray = ensure_ray(cfg, verbose)
    threads = worker_threads(cfg)
    base_path = resolve_base(cfg, records, run_dir)
    if store is not None and store.remote and not cfg.model.name_or_path:
        store.push("base_model")  # workers on any node load it from shared storage
        base_path = f"{store.uri}/base_model"
    from emdpo_ray.models import load_tokenizer

    tokenizer = load_tokenizer(base_path, cfg.model)
    enc = encode(records, tokenizer, cfg.data)
    cuts = shard_indices(len(records), cfg.ray.num_workers)
    shards = [enc.arrays(c) for c in cuts]
    t = time.perf_counter()
    key = fingerprint(records, base_path, tokenizer, cfg.data)
    ref, hit = reference_cache(run_dir, key,
                               lambda: compute_reference(cfg, base_path, shards, threads))
    say(f"reference log-probs: {'cache hit' if hit else 'computed'} "
        f"({len(records)} records, {time.perf_counter() - t:.1f}s)")
    shard_refs = [ray.put({**s, "ref_logps": ref[c]}) for s, c in zip(shards, cuts)]
    return Prepared(base_path, enc, shard_refs, [len(c) for c in cuts], threads)


def train_single_policy(run_dir: str, cfg: Config, say=lambda m: None) -> str:
    """The no-types baseline: one DPO policy on every record with weight 1."""
    from emdpo_ray.mstep import run_mstep

    ident = read_json(os.path.join(run_dir, "run.json"))
    records = load_records(ident["data"])
    prep = prepare_data(cfg, records, run_dir, False, say)
    n = len(records)
    res = run_mstep(cfg, names=["single_dpo"], num_types=1, base_path=prep.base_path,
                    shard_refs=prep.shard_refs, shard_sizes=prep.sizes,
                    weights=np.ones((n, 1)), score_mask=np.zeros((n, 1), dtype=bool),
                    storage_path=cfg.ray.storage_path or os.path.join(run_dir, "ray_results"),
                    run_name=f"single-{time.time_ns()}", seed=cfg.seed * 100003 + 99991,
                    threads=prep.threads)
    out = os.path.join(run_dir, "baselines", "single_dpo")
    with res.checkpoint.as_directory() as d:
        shutil.rmtree(out + ".partial", ignore_errors=True)
        shutil.copytree(os.path.join(d, "policies", "single_dpo"), out + ".partial")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(out + ".partial", out)
    return out


def policy_names(k: int, cross_fit: bool) -> list[str]:
    """Policies trained per M-step: type_k on everyone, plus f<f>_type_k without fold f."""
    names = [f"type_{j}" for j in range(k)]
    if cross_fit:
        names += [f"f{f}_type_{j}" for f in (0, 1) for j in range(k)]
    return names


def _ari(true_types: np.ndarray | None, gamma: np.ndarray) -> float | None:
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


def initial_gamma(cfg: Config, k: int, records, user_index, num_users, restart_fn=None):
    from emdpo_ray import init

    if cfg.em.init == "kmeans":
        return init.kmeans_init(records, user_index, num_users, k, cfg.seed,
                                cfg.em.init_smoothing, cfg.em.init_refine_iterations)
    if cfg.em.init == "labels":
        labels = init.labels_from_records(records, user_index, num_users, k)
        return smoothed_onehot(labels, k, cfg.em.init_smoothing)
    # random: each restart gets one M-step + E-step; the best log-likelihood wins.
    rng = np.random.default_rng(cfg.seed)
    starts = [smoothed_onehot(rng.integers(0, k, num_users), k, cfg.em.init_smoothing)
              for _ in range(cfg.em.restarts)]
    if restart_fn is None or len(starts) == 1:
        return starts[0]
    lls = [restart_fn(g, r) for r, g in enumerate(starts)]
    return starts[int(np.argmax(lls))]


def _identity(cfg: Config, data_path: str, k: int) -> dict:
    return {"data": data_path if "://" in data_path else os.path.abspath(data_path),
            "types": k, "config": cfg.model_dump(mode="json")}


def prepare_run_dir(run_dir: str, identity: dict, overwrite: bool) -> bool:
    """Create or validate the run directory. Returns True when resuming."""
    ident_path = os.path.join(run_dir, "run.json")
    if overwrite and os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    if os.path.exists(ident_path):
        if read_json(ident_path) != identity:
            raise RunDirError(
                f"{run_dir}: holds a run with a different config or data; use another --out "
                "or pass --overwrite to start over")
        for name in os.listdir(run_dir):  # leftovers of a crash mid-write: never read
            if name.startswith(".tmp-") or ".partial" in name:
                path = os.path.join(run_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        return os.path.exists(os.path.join(run_dir, "state.json"))
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        raise RunDirError(f"{run_dir}: exists and is not an emdpo-ray run directory; use "
                          "another --out or pass --overwrite")
    os.makedirs(run_dir, exist_ok=True)
    atomic_write_json(ident_path, identity)
    return False


def train(cfg: Config, data_path: str, k: int, run_dir: str, *, overwrite: bool = False,
          verbose: bool = False, progress=None) -> dict:
    """Run EM-DPO end to end; returns a summary (also written to the run directory)."""
    records = load_records(data_path)  # all-or-nothing: raises before anything is written
    if k < 1:
        raise ValueError(f"--types must be >= 1, got {k}")
    from emdpo_ray.storage import RunStore, checkpoint_from

    store = RunStore(run_dir)
    if overwrite:
        store.delete()
    run_dir = store.pull()
    resuming = prepare_run_dir(run_dir, _identity(cfg, data_path, k), overwrite)
    state_path = os.path.join(run_dir, "state.json")
    if resuming:
        try:
            state = read_json(state_path)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # not ours: ours are atomic
            raise RunDirError(f"{state_path}: unreadable ({e}); pass --overwrite to start "
                              "over") from None
    say = progress or (lambda msg: log.info(msg))
    atomic_write_text(os.path.join(run_dir, "config.yaml"), config_to_yaml(cfg))
    store.push("run.json", "config.yaml")

    prep = prepare_data(cfg, records, run_dir, verbose, say, store)
    ui, u_count, users = prep.enc.user_index, len(prep.enc.users), prep.enc.users
    true_types = user_true_types(records, ui, u_count)
    base_path, shard_refs, sizes, threads = prep.base_path, prep.shard_refs, prep.sizes, prep.threads

    names = policy_names(k, cfg.em.cross_fit)
    fold = np.random.default_rng(cfg.seed + 17).permutation(u_count) % 2
    storage = cfg.ray.storage_path or store.ray_storage()

    def weights_for(gamma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Record weights [N, A] and which (record, policy) scores the E-step needs."""
        g = gamma[ui]
        cols, need = [g], [np.zeros_like(g, dtype=bool)]
        if cfg.em.cross_fit:
            for f in (0, 1):
                out_of_fold = (fold[ui] != f)[:, None]
                cols.append(g * out_of_fold)
                need.append(np.repeat(~out_of_fold, k, axis=1))
        else:
            need[0][:] = True
        return np.concatenate(cols, 1), np.concatenate(need, 1)

    def type_scores(scores: np.ndarray) -> np.ndarray:
        if not cfg.em.cross_fit:
            return scores[:, :k]
        f = fold[ui][:, None]
        return np.where(f == 0, scores[:, k:2 * k], scores[:, 2 * k:3 * k])

    def mstep(gamma: np.ndarray, it: int, init_from, tag: str):
        w, need = weights_for(gamma)
        return run_mstep(cfg, names=names, num_types=k, base_path=base_path,
                         shard_refs=shard_refs, shard_sizes=sizes, weights=w, score_mask=need,
                         storage_path=storage, run_name=f"{tag}-{it:03d}-{time.time_ns()}",
                         seed=cfg.seed * 100003 + it, init_from=init_from, threads=threads,
                         epochs=cfg.em.warm_epochs if init_from is not None else cfg.dpo.epochs)

    from emdpo_ray.mstep import run_mstep

    history: list[dict] = []
    if resuming:
        gamma = np.load(os.path.join(run_dir, state["gamma"]))
        eta, it0 = np.asarray(state["eta"]), state["iteration"] + 1
        prev = EStep(np.log(np.clip(gamma, 1e-300, None)), eta, state["loglik"])
        ckpt = checkpoint_from(state["checkpoint"])
        # history.json is written before state.json: after a crash between the two it holds
        # the iteration in flight, which is redone, so drop it rather than count it twice.
        history = [h for h in read_json(os.path.join(run_dir, "history.json"))
                   if h["iteration"] <= state["iteration"]]
        done = state.get("converged", False)
        say(f"resuming after iteration {state['iteration']}")
    else:
        t = time.perf_counter()

        def restart(g, r):
            res = mstep(g, 0, None, f"restart{r}")
            return e_step(type_scores(res.scores), ui, u_count, g.mean(0)).loglik

        gamma = initial_gamma(cfg, k, records, ui, u_count, restart)
        eta, it0, prev, ckpt, done = gamma.mean(0), 1, None, None, False
        ari = _ari(true_types, gamma)
        say(f"init ({cfg.em.init}): eta={np.round(eta, 3).tolist()}"
            + (f" ari={ari:.3f}" if ari is not None else "") + f" ({time.perf_counter() - t:.1f}s)")

    for it in range(it0, cfg.em.max_iterations + 1):
        if done:
            break
        say(f"iter {it}: M-step")
        res = mstep(gamma, it, ckpt if cfg.em.warm_start else None, "mstep")
        fault_point("estep", it)
        t = time.perf_counter()
        cur = e_step(type_scores(res.scores), ui, u_count, eta)
        t_e = time.perf_counter() - t
        d_gamma = float(np.abs(cur.gamma - gamma).max())
        done = converged(prev, cur, cfg.em.tol_loglik, cfg.em.tol_posterior)
        gamma, eta, prev, ckpt = cur.gamma, cur.eta, cur, res.checkpoint
        ari = _ari(true_types, gamma)
        m = res.metrics
        history.append({
            "iteration": it, "log_likelihood": cur.loglik, "mixing_weights": eta.tolist(),
            "max_delta_gamma": d_gamma, "ari": ari,
            "timings": {"fit_wall_s": res.wall_s, "startup_s": m.get("time/startup_s"),
                        "train_s": m.get("time/train_s"), "score_s": m.get("time/score_s"),
                        "estep_s": t_e},
            "metrics": {key: v for key, v in m.items() if "/" in key and not key.startswith("time/")},
        })
        gamma_file = f"gamma-{it:03d}.npy"
        atomic_save_npy(os.path.join(run_dir, gamma_file), gamma)
        atomic_write_json(os.path.join(run_dir, "history.json"), history)
        fault_point("checkpoint", it)
        store.push(gamma_file, "history.json", "cache")
        atomic_write_json(state_path, {"iteration": it, "gamma": gamma_file,
                                       "eta": eta.tolist(), "loglik": cur.loglik,
                                       "checkpoint": store.checkpoint_uri(ckpt), "converged": done})
        store.push("state.json")
        say(f"iter {it}: loglik={cur.loglik:.2f} eta={np.round(eta, 3).tolist()} "
            f"max|dgamma|={d_gamma:.3g}" + (f" ari={ari:.3f}" if ari is not None else "")
            + f" (fit {res.wall_s:.1f}s)")

    summary = finalize(run_dir, cfg, records, users, gamma, eta, history, ckpt, true_types)
    store.push_all()
    if cfg.mmra.enabled:
        from emdpo_ray.mmra_run import run_mmra

        summary["mmra"] = run_mmra(run_dir, cfg=cfg, progress=say)
        store.push_all()
    return summary


def finalize(run_dir, cfg, records, users, gamma, eta, history, ckpt, true_types) -> dict:
    """Contract outputs: policies/type_k, posteriors.jsonl, plots, summary.json."""
    k = gamma.shape[1]
    with ckpt.as_directory() as d:
        tmp = os.path.join(run_dir, "policies.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for j in range(k):
            shutil.copytree(os.path.join(d, "policies", f"type_{j}"), os.path.join(tmp, f"type_{j}"))
    final = os.path.join(run_dir, "policies")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    lines = [json.dumps({"user_id": u, "posterior": g.tolist(), "type": int(g.argmax())})
             for u, g in zip(users, gamma)]
    atomic_write_text(os.path.join(run_dir, "posteriors.jsonl"), "\n".join(lines) + "\n")
    summary = {"types": k, "users": len(users), "records": len(records),
               "iterations": len(history), "mixing_weights": eta.tolist(),
               "log_likelihood": history[-1]["log_likelihood"] if history else None,
               "ari": _ari(true_types, gamma)}
    atomic_write_json(os.path.join(run_dir, "summary.json"), summary)
    from emdpo_ray.plots import plot_run

    plot_run(run_dir, history, gamma, true_types)
    return summary
