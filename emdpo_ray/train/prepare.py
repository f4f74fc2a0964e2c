"""Everything an M-step needs before the first one: base model, token arrays, cached
reference log-probs, per-worker shards in the object store.

The reference is shared by every type, so its log-probs are computed once (shards scored in
parallel as Ray tasks) and cached in the run directory under a fingerprint of the data, the
model, the tokenizer and the length limits.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from emdpo_ray.config import Config, ModelConfig
from emdpo_ray.data.encode import Encoded, encode, fingerprint, shard_indices
from emdpo_ray.data.records import Record
from emdpo_ray.run.ray_runtime import RayRuntime
from emdpo_ray.run.rundir import RunDir
from emdpo_ray.utils import atomic_save_npy


def resolve_base(cfg: Config, records: list[Record], rd: RunDir) -> str:
    """Path (or hub id) of the base model; builds the default tiny model once per run."""
    if cfg.model.name_or_path:
        from emdpo_ray.models.loading import check_model_safety

        check_model_safety(cfg.model.name_or_path, cfg.model)  # refuse before any worker loads it
        # Names and hub ids are resolved on each node where they are loaded.
        return cfg.model.name_or_path
    if not os.path.isdir(rd.base_model_dir):
        from emdpo_ray.models.tiny import build_tiny_model

        texts = [t for r in records for t in (r.prompt, *r.responses)]
        build_tiny_model(texts, rd.base_model_dir, cfg.model, cfg.seed)
    return rd.shared_base_path()


def cached(path: str, compute) -> tuple[np.ndarray, bool]:
    """The array at `path`, computed and saved atomically on a miss; (array, cache_hit)."""
    if os.path.exists(path):
        return np.load(path), True
    arr = compute()
    atomic_save_npy(path, arr)
    return arr, False


def _reference_task(base_path: str, model_cfg: dict, arrays: dict, threads: int) -> np.ndarray:
    import torch

    from emdpo_ray.models.bank import sequence_logps
    from emdpo_ray.models.loading import load_base
    from emdpo_ray.models.scoring import reference_logps

    torch.set_num_threads(threads)
    base = load_base(base_path, ModelConfig.model_validate(model_cfg)).eval()

    def forward(input_ids, attention_mask, loss_mask, policy):
        return sequence_logps(base, input_ids, attention_mask, loss_mask)

    return reference_logps(forward, arrays, torch.device("cpu"))


@dataclass
class Prepared:
    cfg: Config
    base_path: str
    enc: Encoded
    shard_refs: list
    sizes: list[int]
    threads: int
    storage: str          # where Ray Train keeps this run's checkpoints

    def run_mstep(self, *, names: list[str], num_types: int, weights: np.ndarray,
                  score_mask: np.ndarray, run_name: str, seed: int, init_from=None,
                  epochs: float | None = None, threads: int | None = None):
        """One M-step on these shards (train/mstep.py); see `run_mstep` for the arguments."""
        from emdpo_ray.train.mstep import run_mstep

        return run_mstep(self.cfg, names=names, num_types=num_types, base_path=self.base_path,
                         shard_refs=self.shard_refs, shard_sizes=self.sizes, weights=weights,
                         score_mask=score_mask, storage_path=self.storage, run_name=run_name,
                         seed=seed, init_from=init_from, threads=threads or self.threads,
                         epochs=epochs)


def prepare_data(cfg: Config, records: list[Record], rd: RunDir, verbose: bool = False,
                 say=lambda m: None) -> Prepared:
    """Base model, token arrays, cached reference log-probs, shards in the object store."""
    rt = RayRuntime(cfg, verbose)
    base_path = resolve_base(cfg, records, rd)
    from emdpo_ray.models.loading import load_tokenizer

    tokenizer = load_tokenizer(base_path, cfg.model)
    enc = encode(records, tokenizer, cfg.data)
    cuts = shard_indices(len(records), cfg.ray.num_workers)
    shards = [enc.arrays(c) for c in cuts]
    t = time.perf_counter()
    key = fingerprint(records, base_path, tokenizer, cfg.data)
    model_json = cfg.model.model_dump(mode="json")
    ref, hit = cached(rd.reference_cache(key), lambda: np.concatenate(rt.fan_out(
        _reference_task, [(base_path, model_json, s, rt.threads) for s in shards])))
    say(f"reference log-probs: {'cache hit' if hit else 'computed'} "
        f"({len(records)} records, {time.perf_counter() - t:.1f}s)")
    shard_refs = [rt.put({**s, "ref_logps": ref[c]}) for s, c in zip(shards, cuts)]
    return Prepared(cfg, base_path, enc, shard_refs, [len(c) for c in cuts], rt.threads,
                    rd.ray_storage(cfg))
