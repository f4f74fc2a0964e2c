"""One M-step on one DeepSpeed rank: train every policy on weighted records, then score them.

Runs inside a resident worker (train/workers.py) each EM iteration. The K LoRA adapters share
one base and one batched forward (PEFT `adapter_names` per row), and their losses are summed,
so each adapter only receives the gradient of its own weighted loss.

Checkpoints are DeepSpeed's own (`engine.save_checkpoint`, every ZeRO stage: each rank writes
its partition of the trainable weights and optimizer state) under `<fit>/step-NNNNNN/`, marked
COMPLETE by rank 0 once every rank has written. A restarted group resumes from the newest
complete one, skipping no batch and repeating none: the batch order is a pure function of the
seed. The M-step's result (policies/, one folder per policy) goes to `<fit>/final/`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import numpy as np
import torch

from emdpo_ray.config import Config
from emdpo_ray.core.losses import pl_dpo_loss
from emdpo_ray.models.bank import PolicyBank
from emdpo_ray.models.scoring import pair_logps, score_pairs

DS_TAG = "ds"
COMPLETE = "COMPLETE"
FINAL = "final"


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


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def training_pairs(w: np.ndarray, idx: np.ndarray, every_pair: bool) -> np.ndarray:
    """(record, policy) rows of one batch. Exact zero weights (cross-fit folds) are skipped,
    except under ZeRO, where every rank must run every adapter every step: ZeRO's gradient
    collectives follow the parameters that received a gradient."""
    rec, pol = np.nonzero(np.ones_like(w, dtype=bool) if every_pair else w > 0)
    return np.stack([idx[rec], pol], 1)


def score_layout(score_mask: np.ndarray, rows_per_batch: int, m: int,
                 aligned: bool) -> tuple[np.ndarray, int]:
    """(pairs to score, pairs per forward). ZeRO-3 gathers each module's weights as it runs,
    so every rank must run the same modules in the same order: all policies of whole
    records in every forward (batches aligned to whole records)."""
    a = score_mask.shape[1]
    per = max(1, rows_per_batch // m)
    if not aligned:
        rec, pol = np.nonzero(score_mask)
        return np.stack([rec, pol], 1), per
    rec, pol = np.nonzero(np.ones_like(score_mask, dtype=bool))
    return np.stack([rec, pol], 1), max(a, per // a * a)


# -- storage: the fit's folder, local or on any pyarrow filesystem --

def _fs(uri: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def upload(local_dir: str, uri: str) -> None:
    import pyarrow.fs as pafs

    fs, root = _fs(uri)
    fs.create_dir(root, recursive=True)
    pafs.copy_files(local_dir, root, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download(uri: str, local_dir: str) -> None:
    import pyarrow.fs as pafs

    fs, root = _fs(uri)
    pafs.copy_files(root, local_dir, source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())


def latest_complete_step(fit_uri: str) -> int | None:
    """The newest mid-fit checkpoint every rank finished writing, if any."""
    import pyarrow.fs as pafs

    fs, root = _fs(fit_uri)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    steps = sorted((int(i.base_name[5:]) for i in infos
                    if i.type == pafs.FileType.Directory and i.base_name.startswith("step-")),
                   reverse=True)
    for s in steps:
        if fs.get_file_info(f"{root}/{step_name(s)}/{COMPLETE}").type == pafs.FileType.File:
            return s
    return None


def _mark_complete(fit_uri: str, step: int | None) -> None:
    """Rank 0, after every rank wrote: mark `step` complete and delete the older ones
    (step None: delete them all, the fit is over)."""
    import pyarrow.fs as pafs

    fs, root = _fs(fit_uri)
    if step is not None:
        with fs.open_output_stream(f"{root}/{step_name(step)}/{COMPLETE}") as f:
            f.write(b"ok")
    for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if i.base_name.startswith("step-") and (step is None or i.base_name != step_name(step)):
            fs.delete_dir(i.path)


def save_step(engine, fit_uri: str, step: int, sums: dict, rank: int) -> None:
    """Every rank: DeepSpeed checkpoint of the trainable weights + optimizer at `step`."""
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, save_latest=False,
                               exclude_frozen_parameters=True)
        if rank == 0:
            with open(os.path.join(tmp, "progress.json"), "w") as f:
                json.dump({"step": step, "sums": sums}, f)
        upload(tmp, f"{fit_uri}/{step_name(step)}")
    dist.barrier()
    if rank == 0:
        _mark_complete(fit_uri, step)


def load_step(engine, fit_uri: str, step: int) -> dict:
    """Every rank: restore weights and optimizer state; returns the metric sums so far."""
    with tempfile.TemporaryDirectory() as tmp:
        download(f"{fit_uri}/{step_name(step)}", tmp)
        path, _ = engine.load_checkpoint(tmp, tag=DS_TAG, load_module_strict=False)
        if path is None:
            raise RuntimeError(f"{fit_uri}/{step_name(step)}: DeepSpeed could not load it")
        with open(os.path.join(tmp, "progress.json")) as f:
            return json.load(f)["sums"]


def optimizer_state_tensors(engine) -> int:
    """Tensors in the innermost torch optimizer's state (Adam moments once it has stepped)."""
    opt = engine.optimizer
    while hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return sum(torch.is_tensor(v) for st in opt.state.values() for v in st.values())


def _gathered(engine, stage: int):
    """Full trainable weights on every rank (ZeRO-3 keeps only a partition), for saving."""
    import contextlib

    if stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(
        [p for p in engine.module.parameters() if p.requires_grad], modifier_rank=None)


def run_fit(cfg: Config, job: dict, base, shard: dict, ref: np.ndarray, weights: np.ndarray,
            score_mask: np.ndarray, rank: int, world: int, device, progress=None) -> dict | None:
    """Train the policies `job["names"]` on this rank's shard and score it; rank 0 returns
    {"rewards": [N, A, m] of every rank, "metrics", "checkpoint": URI of final/}."""
    import deepspeed
    import torch.distributed as dist

    t0 = time.perf_counter()
    names, seed, stage = job["names"], job["seed"], cfg.ray.zero_stage
    torch.manual_seed(seed)
    init_from = job.get("init_from")
    if init_from is not None:
        with init_from.as_directory() as d:
            bank = PolicyBank(base, cfg.model, names, init_from=os.path.join(d, "policies"))
    else:
        bank = PolicyBank(base, cfg.model, names)
    bank.forward = bank.logps  # the engine calls forward
    params = [p for p in bank.parameters() if p.requires_grad]
    bs = cfg.dpo.batch_size
    engine, _, _, _ = deepspeed.initialize(model=bank, model_parameters=params,
                                           config=deepspeed_config(cfg, bs))
    fit_uri = job["fit_uri"]
    first, sums, restored = 0, {}, 0
    resume_at = latest_complete_step(fit_uri) if job.get("resume") else None
    if resume_at is not None:
        sums, first = load_step(engine, fit_uri, resume_at), resume_at
        restored = optimizer_state_tensors(engine)
    t_start = time.perf_counter() - t0

    # Every rank takes the same number of steps (collectives must line up); shorter shards
    # wrap around their own shuffled order.
    n = len(weights)
    steps = max(cfg.dpo.min_steps, math.ceil(job["epochs"] * math.ceil(job["max_shard"] / bs)))
    rng = np.random.default_rng(seed * 1000 + rank)
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(steps * bs / n) + 1)])
    norm = torch.as_tensor(job["weight_means"], dtype=torch.float32) * bs
    t1 = time.perf_counter()
    every = cfg.ray.checkpoint_every_steps
    for step in range(first, steps):
        idx = order[step * bs:(step + 1) * bs]
        pairs = training_pairs(weights[idx], idx, every_pair=stage > 0)
        rec, pol = pairs[:, 0], pairs[:, 1]
        lp, cnt, mask = pair_logps(engine, shard, pairs, device)
        ref_b = torch.as_tensor(ref[rec], device=lp.device)
        loss = lp.new_zeros(())
        for a in range(len(names)):
            sel = torch.as_tensor(pol == a)
            if not sel.any():
                continue
            nll = -lp[sel, 0] / cnt[sel, 0].clamp_min(1)
            la, metrics = pl_dpo_loss(lp[sel], ref_b[sel], torch.as_tensor(weights[rec[sel.numpy()], a]),
                                      cfg.dpo.beta, mask[sel], normalizer=norm[a],
                                      sft_nll=nll, sft_weight=cfg.dpo.sft_weight)
            loss = loss + la
            if a < job["num_types"]:
                for key, v in metrics.items():
                    sums[f"{names[a]}/{key}"] = sums.get(f"{names[a]}/{key}", 0.0) + float(v)
        engine.backward(loss)
        engine.step()
        sums["train/loss"] = sums.get("train/loss", 0.0) + float(loss)
        if rank == 0 and progress is not None and (step % 5 == 4 or step + 1 == steps):
            progress.put((step + 1, steps, float(loss)))
        if every and (step + 1) % every == 0 and step + 1 < steps:
            save_step(engine, fit_uri, step + 1, sums, rank)
    t_train = time.perf_counter() - t1

    t2 = time.perf_counter()
    pairs, per = score_layout(score_mask, 512, shard["input_ids"].shape[1], aligned=stage == 3)
    batches = torch.tensor([math.ceil(len(pairs) / per)])
    dist.all_reduce(batches, op=dist.ReduceOp.MAX)
    scored = score_pairs(engine, shard, ref, cfg.dpo.beta, pairs, device, pairs_per_batch=per,
                         min_batches=int(batches) if stage == 3 else 0)
    rewards = np.full((*score_mask.shape, scored.shape[1]), np.nan)
    keep = score_mask[pairs[:, 0], pairs[:, 1]]
    rewards[pairs[keep, 0], pairs[keep, 1]] = scored[keep]
    gathered = [None] * world
    dist.all_gather_object(gathered, rewards)
    t_score = time.perf_counter() - t2

    final = f"{fit_uri}/{FINAL}"
    with _gathered(engine, stage), tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            engine.module.save(os.path.join(tmp, "policies"))
            upload(tmp, final)
    dist.barrier()
    engine.destroy()
    if rank != 0:
        return None
    _mark_complete(fit_uri, None)  # mid-fit checkpoints are no longer needed
    metrics = {k: v / steps for k, v in sums.items()}
    metrics.update({"time/startup_s": t_start, "time/train_s": t_train,
                    "time/score_s": t_score, "train/steps": steps,
                    "train/resumed_from_step": first,
                    "train/restored_optimizer_tensors": restored})
    return {"rewards": np.concatenate(gathered), "metrics": metrics, "checkpoint": final}
