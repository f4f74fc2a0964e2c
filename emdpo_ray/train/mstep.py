"""M-step on Ray Train + DeepSpeed: train every policy on weighted records, then score them.

One `TorchTrainer.fit()` per EM iteration trains all policies at once: the K LoRA adapters
share one base and one batched forward (PEFT `adapter_names` per row), and their losses are
summed, so each adapter only receives the gradient of its own weighted loss. A `fit()` costs
12-17 s of fixed start-up on a laptop, so amortising K trainings into one pays for itself.

Each worker reads only its shard (an object-store reference put by the driver), trains,
scores its shard's records under every policy (Plackett-Luce log-likelihood with the cached
reference log-probs), and rank 0 reports the policies and the gathered scores as a Ray Train
checkpoint under the run's storage path.

Every `ray.checkpoint_every_steps` steps rank 0 also reports a mid-fit checkpoint (policies,
optimizer moments, step). When a worker dies, Ray Train restarts the group (up to
`ray.max_failures` times) and the new workers continue from that checkpoint, skipping no
batch and repeating none: the batch order is a pure function of the seed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from emdpo_ray.config import Config
from emdpo_ray.core.losses import pl_dpo_loss
from emdpo_ray.models.bank import PolicyBank
from emdpo_ray.models.loading import load_base
from emdpo_ray.models.scoring import pair_logps, score_pairs


def deepspeed_config(cfg: Config, batch_size: int) -> dict:
    ds = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.dpo.max_grad_norm,
        # torch_adam: the torch AdamW kernel; without it DeepSpeed JIT-compiles FusedAdam.
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.dpo.learning_rate,
                                                  "weight_decay": cfg.dpo.weight_decay,
                                                  "torch_adam": True}},
        "zero_optimization": {"stage": cfg.ray.zero_stage},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if cfg.ray.use_gpu:
        ds["bf16"] = {"enabled": True}
    return ds


def optimizer_state_to_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], str]:
    """A torch optimizer state_dict as flat tensors plus JSON (safetensors, not pickle)."""
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{key}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = v
    return tensors, json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], meta: str) -> dict:
    """Inverse of optimizer_state_to_tensors."""
    info = json.loads(meta)
    state: dict[int, dict] = {}
    for flat, v in [*tensors.items(), *info["scalars"].items()]:
        pid, key = flat.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    return {"state": state, "param_groups": info["param_groups"]}


def save_progress(out: str, engine, step: int, sums: dict, with_optimizer: bool) -> None:
    """Mid-fit checkpoint contents: policies/, optimizer.safetensors, progress.json."""
    from safetensors.torch import save_file

    engine.module.save(os.path.join(out, "policies"))
    if with_optimizer:
        tensors, meta = optimizer_state_to_tensors(engine.optimizer.state_dict())
        save_file(tensors, os.path.join(out, "optimizer.safetensors"), metadata={"meta": meta})
    with open(os.path.join(out, "progress.json"), "w") as f:
        json.dump({"step": step, "sums": sums}, f)


def load_progress(folder: str, engine) -> tuple[int, dict]:
    """Restore the optimizer from a mid-fit checkpoint; returns (next step, metric sums)."""
    from safetensors import safe_open

    opt = os.path.join(folder, "optimizer.safetensors")
    if os.path.exists(opt):
        with safe_open(opt, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata()["meta"]
        engine.optimizer.load_state_dict(optimizer_state_from_tensors(tensors, meta))
    with open(os.path.join(folder, "progress.json")) as f:
        prog = json.load(f)
    return prog["step"], prog["sums"]


def _train_loop(config: dict) -> None:
    """Runs on every Ray Train worker. Only the marked lines are Ray/DeepSpeed specific."""
    import deepspeed
    import ray
    import ray.train
    import torch.distributed as dist

    cfg = Config.model_validate(config["cfg"])
    ctx = ray.train.get_context()                                     # Ray
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.ray.use_gpu \
        else torch.device("cpu")
    t0 = time.perf_counter()
    deepspeed.init_distributed(dist_backend="nccl" if cfg.ray.use_gpu else "gloo")  # DeepSpeed

    shard = ray.get(config["shards"][rank])                           # Ray: only this shard
    weights = ray.get(config["weights"][rank])                        # [n, A]
    score_mask = ray.get(config["score_masks"][rank])                 # [n, A]
    ref = shard.pop("ref_logps")
    names = config["names"]
    seed = config["seed"]
    torch.manual_seed(seed)

    dtype = torch.bfloat16 if cfg.ray.use_gpu else torch.float32
    base = load_base(config["base_path"], cfg.model, dtype=dtype)
    # A restarted worker group continues from this fit's last checkpoint (Ray Train
    # passes it back); a first attempt warm-starts from the previous EM iteration.
    resume = ray.train.get_checkpoint()                               # Ray
    init_ckpt = resume if resume is not None else config.get("init_from")
    if init_ckpt is not None:
        with init_ckpt.as_directory() as d:
            bank = PolicyBank(base, cfg.model, names, init_from=os.path.join(d, "policies"))
    else:
        bank = PolicyBank(base, cfg.model, names)
    bank.forward = bank.logps  # the engine calls forward
    params = [p for p in bank.parameters() if p.requires_grad]
    bs = cfg.dpo.batch_size
    engine, _, _, _ = deepspeed.initialize(model=bank, model_parameters=params,  # DeepSpeed
                                           config=deepspeed_config(cfg, bs))
    t_start = time.perf_counter() - t0

    # Every worker takes the same number of steps (collectives must line up); shorter
    # shards wrap around their own shuffled order.
    n = len(weights)
    steps = max(cfg.dpo.min_steps,
                math.ceil(config["epochs"] * math.ceil(config["max_shard"] / bs)))
    rng = np.random.default_rng(seed * 1000 + rank)
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(steps * bs / n) + 1)])
    norm = torch.as_tensor(config["weight_means"], dtype=torch.float32) * bs
    t1 = time.perf_counter()
    sums: dict[str, float] = {}
    first = 0
    if resume is not None:
        with resume.as_directory() as d:
            first, sums = load_progress(d, engine)
    every = cfg.ray.checkpoint_every_steps
    for step in range(first, steps):
        idx = order[step * bs:(step + 1) * bs]
        w = weights[idx]
        rec, pol = np.nonzero(w > 0)  # skip exact zeros (cross-fit folds): no compute wasted
        pairs = np.stack([idx[rec], pol], 1)
        lp, cnt, mask = pair_logps(engine, shard, pairs, device)
        ref_b = torch.as_tensor(ref[pairs[:, 0]], device=lp.device)
        loss = lp.new_zeros(())
        for a in range(len(names)):
            sel = torch.as_tensor(pol == a)
            if not sel.any():
                continue
            nll = -lp[sel, 0] / cnt[sel, 0].clamp_min(1)
            la, metrics = pl_dpo_loss(lp[sel], ref_b[sel], torch.as_tensor(w[rec[sel.numpy()], a]),
                                      cfg.dpo.beta, mask[sel], normalizer=norm[a],
                                      sft_nll=nll, sft_weight=cfg.dpo.sft_weight)
            loss = loss + la
            if a < config["num_types"]:
                for key, v in metrics.items():
                    sums[f"{names[a]}/{key}"] = sums.get(f"{names[a]}/{key}", 0.0) + float(v)
        engine.backward(loss)                                          # DeepSpeed
        engine.step()                                                  # DeepSpeed
        sums["train/loss"] = sums.get("train/loss", 0.0) + float(loss)
        if rank == 0 and config.get("progress") is not None and (step % 5 == 4 or step + 1 == steps):
            config["progress"].put((step + 1, steps, float(loss)))
        if every and (step + 1) % every == 0 and step + 1 < steps:
            progress = {"train/step": step + 1, "train/resumed_from_step": first}
            if rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    save_progress(tmp, engine, step + 1, sums, cfg.ray.zero_stage == 0)
                    ray.train.report(progress, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(progress)
    t_train = time.perf_counter() - t1

    t2 = time.perf_counter()
    rec, pol = np.nonzero(score_mask)
    pairs = np.stack([rec, pol], 1)
    scores = np.full(score_mask.shape, np.nan)
    scores[rec, pol] = score_pairs(engine, shard, ref, cfg.dpo.beta, pairs, device)
    gathered = [None] * world
    dist.all_gather_object(gathered, scores)                          # gloo/NCCL gather
    t_score = time.perf_counter() - t2

    metrics = {k: v / steps for k, v in sums.items()}
    metrics.update({"time/startup_s": t_start, "time/train_s": t_train,
                    "time/score_s": t_score, "train/steps": steps,
                    "train/resumed_from_step": first})
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            # progress.json too: a group restarted after this report resumes at the end
            save_progress(tmp, engine, steps, sums, with_optimizer=False)
            np.save(os.path.join(tmp, "scores.npy"), np.concatenate(gathered))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


@dataclass
class MStepResult:
    scores: np.ndarray            # [N, A] Plackett-Luce log-lik per record and policy (NaN: unscored)
    checkpoint: object            # ray.train.Checkpoint holding policies/<name>/
    metrics: dict
    wall_s: float


def run_mstep(cfg: Config, *, names: list[str], num_types: int, base_path: str,
              shard_refs: list, shard_sizes: list[int], weights: np.ndarray,
              score_mask: np.ndarray, storage_path: str, run_name: str, seed: int,
              init_from=None, threads: int = 1, epochs: float | None = None,
              on_steps=None) -> MStepResult:
    """One fit(): train the policies `names` on `weights` [N, A] and score `score_mask`.
    `on_steps(done, total, loss)` follows the training steps (rank 0 reports every 5)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    queue = None
    if on_steps is not None:
        from ray.util.queue import Queue

        queue = Queue()
    bounds = np.cumsum([0] + list(shard_sizes))
    cuts = [slice(bounds[i], bounds[i + 1]) for i in range(len(shard_sizes))]
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"), "names": names, "num_types": num_types,
            "base_path": base_path, "shards": shard_refs, "seed": seed,
            "weights": [ray.put(weights[c]) for c in cuts],
            "score_masks": [ray.put(score_mask[c]) for c in cuts],
            "weight_means": weights.mean(0).tolist(), "max_shard": max(shard_sizes),
            "init_from": init_from, "threads": threads,
            "epochs": cfg.dpo.epochs if epochs is None else epochs,
            "progress": queue,
        },
        scaling_config=ScalingConfig(num_workers=len(shard_refs), use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": threads}),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if cfg.ray.use_gpu
                                             else "cpu"}}),
    )
    result = _fit_following(trainer, queue, on_steps)
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        scores = np.load(os.path.join(d, "scores.npy"))
    return MStepResult(scores, result.checkpoint, dict(result.metrics or {}),
                       time.perf_counter() - t0)


def _fit_following(trainer, queue, on_steps):
    """trainer.fit(), passing the workers' step reports to `on_steps` as they come."""
    if queue is None:
        return trainer.fit()
    import threading

    from ray.util.queue import Empty

    out: dict = {}

    def fit():
        try:
            out["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the caller's thread
            out["error"] = e

    t = threading.Thread(target=fit, daemon=True)
    t.start()
    while t.is_alive() or not queue.empty():
        try:
            on_steps(*queue.get(timeout=0.5))
        except Empty:
            pass
    t.join()
    import ray

    ray.kill(queue.actor)
    if "error" in out:
        raise out["error"]
    return out["result"]
