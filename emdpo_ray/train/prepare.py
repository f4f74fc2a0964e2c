"""Everything an M-step needs before the first one: base model (fine-tuned into a language
model first when it is the tiny default, train/sft.py), per-worker shards of the records in
the object store, encoded into token arrays by the workers themselves (the driver keeps only
who ranked what: a million records' arrays never pass through it), cached reference log-probs.

The reference is shared by every type, so its log-probs are computed once (each rank of the
worker group scoring its shard) and cached in the run directory under a fingerprint of the data, the
model, the tokenizer and the length limits.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass

import numpy as np

from emdpo_ray.config import Config, DataConfig
from emdpo_ray.data.encode import RecordIndex, RecordShard, fingerprint, index_records, shard_indices
from emdpo_ray.data.records import Record
from emdpo_ray.run.ray_runtime import RayRuntime
from emdpo_ray.run.rundir import RunDir
from emdpo_ray.utils import atomic_save_npy


def base_plan(cfg: Config, rd: RunDir) -> tuple[str | None, bool]:
    """(where the base model is now, or None for the default tiny model still to be built
    (tiny_base), whether it still needs SFT); cheap, so the workers can start before the
    build. A named model is used as is, or fine-tuned into the run's base_model/ when
    model.sft_epochs > 0; the default tiny model is built once per run and always
    fine-tuned (model.tiny.sft_epochs)."""
    mc = cfg.model
    if mc.name_or_path:
        from emdpo_ray.models.loading import check_model_safety

        check_model_safety(mc.name_or_path, mc)  # refuse before any worker loads it
    if rd.base_path(cfg) == mc.name_or_path:
        return mc.name_or_path, False  # names and hub ids are resolved where they are loaded
    if os.path.isdir(rd.base_model_dir):
        return rd.base_model_dir, False  # built (and fine-tuned) by an earlier attempt
    if mc.name_or_path:
        return mc.name_or_path, True
    return None, bool(mc.sft_passes)


def tiny_base(cfg: Config, records: list[Record], rd: RunDir) -> str:
    """The default tiny model built on the records' text (where SFT starts from, or with no
    SFT passes the base itself)."""
    from emdpo_ray.models.tiny import build_tiny_model

    texts = [t for r in records for t in (r.prompt, *r.responses)]
    target = rd.base_init_dir if cfg.model.sft_passes else rd.base_model_dir
    return build_tiny_model(texts, target, cfg.model, cfg.seed)


def cached(path: str, compute) -> tuple[np.ndarray, bool]:
    """The array at `path`, computed and saved atomically on a miss; (array, cache_hit)."""
    if os.path.exists(path):
        return np.load(path), True
    arr = compute()
    atomic_save_npy(path, arr)
    return arr, False


@dataclass
class Prepared:
    """The run's data on the workers. The resident worker group (train/workers.py) starts
    for SFT when there is one, otherwise on first use, and lives until `close()` (or the end
    of a `with` block)."""
    cfg: Config
    base_path: str
    index: RecordIndex
    shard_refs: list
    sizes: list[int]
    threads: int
    storage: str          # where the M-steps keep their checkpoints
    reference: np.ndarray | None = None   # [N, m] reference log-probs, once known
    timings: dict | None = None           # sft_s, reference_s (seconds, this process)
    sentence_ends: np.ndarray | None = None  # token ids that end a sentence (the start's pooling)
    _group: object = None

    @property
    def group(self):
        if self._group is None:
            from emdpo_ray.train.workers import WorkerGroup

            group = WorkerGroup(self.cfg, self.threads, self.storage, len(self.shard_refs))
            group.load(self.base_path, self.shard_refs, self.sizes, self.reference)
            self._group = group
        return self._group

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None

    def __enter__(self) -> "Prepared":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run_mstep(self, *, names: list[str], num_types: int, weights: np.ndarray,
                  score_mask: np.ndarray, run_name: str, seed: int, init_from=None,
                  epochs: float | None = None, on_steps=None):
        """One M-step on the resident group: train `names` on `weights` [N, A], score
        `score_mask` [N, A]; `on_steps(done, total, loss)` follows the steps."""
        job = {"names": names, "num_types": num_types, "seed": seed, "init_from": init_from,
               "run_name": run_name,
               "epochs": self.cfg.dpo.epochs if epochs is None else epochs}
        return self.group.fit(job, weights, score_mask, on_steps)


def ship_shards(records: list[Record], tokenizer, cfg: DataConfig, responses: int,
                num_shards: int, put) -> tuple[list, list[int]]:
    """Contiguous shards of the records into the object store, one at a time, each with what
    its worker needs to encode it (`RecordShard`)."""
    refs, sizes = [], []
    for c in shard_indices(len(records), num_shards):
        part = records[int(c[0]):int(c[-1]) + 1] if len(c) else []
        refs.append(put(RecordShard(part, tokenizer, cfg, responses)))
        sizes.append(len(c))
    return refs, sizes


def prepare_data(cfg: Config, records: list[Record], rd: RunDir, verbose: bool = False,
                 say=lambda m: None, on_steps=None) -> Prepared:
    """Base model, token arrays, cached reference log-probs, shards in the object store.
    `on_steps(phase, done, total, loss)` follows long phases (SFT)."""
    rt = RayRuntime(cfg, verbose)
    src, needs_sft = base_plan(cfg, rd)
    storage = rd.ray_storage(cfg)
    group = prep = None
    if needs_sft:  # SFT runs on the worker group: it starts while the base is built, torch
        # imported and the data encoded (~2 s of its start hidden on 2 CPUs, bench/em_speed.py)
        from emdpo_ray.train.workers import WorkerGroup

        group = WorkerGroup(cfg, rt.threads, storage, cfg.ray.num_workers)
    try:
        from emdpo_ray.models.features import sentence_end_ids
        from emdpo_ray.models.loading import load_tokenizer

        if src is None:
            src = tiny_base(cfg, records, rd)
        tokenizer = load_tokenizer(src, cfg.model)  # SFT keeps the tokenizer: encode once
        index = index_records(records)
        refs, sizes = ship_shards(records, tokenizer, cfg.data, index.resp_mask.shape[1],
                                  cfg.ray.num_workers, rt.put)
        timings = {}
        if needs_sft:
            from emdpo_ray.train.sft import run_sft
            from emdpo_ray.utils import fault_point

            t = time.perf_counter()
            group.load(None, refs, sizes)
            timings["worker_group_start_s"] = time.perf_counter() - t  # what was not overlapped
            steps = ((lambda done, total, loss: on_steps("SFT", done, total, loss))
                     if on_steps else None)
            t = time.perf_counter()
            run_sft(cfg, group, src, rd.base_model_dir, index.resp_mask, sizes,
                    cfg.model.sft_passes, say, steps, before_save=lambda: fault_point("sft", 0))
            timings["sft_s"] = time.perf_counter() - t
            shutil.rmtree(rd.base_init_dir, ignore_errors=True)
        base_path = (src if src == cfg.model.name_or_path and not needs_sft
                     else rd.shared_base_path())
        if group is not None:
            group.use_base(base_path)  # the ranks hold it; a replaced one loads it from here
        prep = Prepared(cfg, base_path, index, refs, sizes, rt.threads, storage,
                        timings=timings, sentence_ends=sentence_end_ids(tokenizer),
                        _group=group)
        started = group is None
        t = time.perf_counter()
        # the policies' dtype is part of the key: bf16 reference log-probs on GPU
        key = (fingerprint(records, base_path, tokenizer, cfg.data)
               + ("-bf16" if cfg.ray.use_gpu else ""))
        prep.reference, hit = cached(rd.reference_cache(key),
                                     lambda: prep.group.reference_logps())
    except BaseException:  # no worker group outlives a failed preparation
        if prep is not None:
            prep.close()
        elif group is not None:
            group.close()
        raise
    if not hit:
        if started:  # the group started for it: count that apart
            timings["worker_group_start_s"] = prep.group.start_s
        timings["reference_s"] = time.perf_counter() - t - (prep.group.start_s if started else 0)
    say(f"reference log-probs: {'cache hit' if hit else 'computed by the workers'} "
        f"({len(records)} records, {time.perf_counter() - t:.1f}s)")
    return prep
