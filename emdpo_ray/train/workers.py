"""The resident DeepSpeed worker group: started once per run, called every M-step.

    group = WorkerGroup(cfg, threads, storage, world)   # placement group, actors: returns at once
    group.load(base_path, shard_refs, sizes)  # every rank: its base model, and its records,
                                              # which it encodes (arrays never pass the driver)
    group.sft(...)                          # optional: fine-tune the base in place (train/sft.py)
    ref = group.reference_logps()           # once, in the policies' dtype (cached by the caller)
    res = group.fit(job, weights, score_mask)   # per M-step: only weights [N, A] travel
    group.close()

Long-lived Ray actors, one per rank, each holding its process-group rank, the base model and
its data shard (the pattern of OpenRLHF's `RayActorGroup` and verl's `RayWorkerGroup`). An
M-step costs its forward/backward and scoring plus a DeepSpeed engine over a fresh copy of the
base: no worker start, no process group, no model load, no data transfer.

Faults: when a worker dies its peers are stuck in a collective, so the whole group is replaced
(new actors, new process group) and the M-step resumes from its newest complete checkpoint
(train/mstep.py), up to `ray.max_failures` times. Ray Train owns nothing here: its `fit()`
starts a new worker group each call, and V2 has no public way to keep one alive.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from emdpo_ray.config import Config
from emdpo_ray.data.encode import RecordShard

log = logging.getLogger(__name__)

# PEFT runs a mixed batch's adapters in set order; under ZeRO-3 each one's weights are
# gathered collectively, so every rank must iterate in the same order: one hash seed.
WORKER_ENV = {"PYTHONHASHSEED": "0"}


class PolicyWorker:
    """One rank: process group, base model, data shard; trains and scores on request."""

    def __init__(self, cfg_json: dict, rank: int, world: int, threads: int):
        import torch

        self.cfg = Config.model_validate(cfg_json)
        self.rank, self.world = rank, world
        torch.set_num_threads(threads)
        self.shard = self.ref = self.base = None

    def address(self) -> tuple[str, int]:
        import ray

        from emdpo_ray.utils import free_port

        return ray.util.get_node_ip_address(), free_port()

    def connect(self, master: tuple[str, int]) -> None:
        import deepspeed
        import torch

        addr, port = master
        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world), LOCAL_RANK="0")
        gpu = self.cfg.ray.use_gpu
        if gpu:
            torch.cuda.set_device(0)  # Ray exposes this worker's GPU as device 0
        self.device = torch.device("cuda", 0) if gpu else torch.device("cpu")
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo",
                                   auto_mpi_discovery=False, verbose=False,
                                   init_method=f"tcp://{addr}:{port}",
                                   rank=self.rank, world_size=self.world)
        self.dtype = torch.bfloat16 if gpu else torch.float32

    def load(self, base_path: str | None, shard: RecordShard) -> tuple[int, int]:
        """Encode this rank's records (data/encode.py), and load the base model unless SFT
        is about to build it; (prompts, responses) truncated in this shard."""
        from emdpo_ray.models.loading import load_base

        if base_path is not None:
            self.base = load_base(base_path, self.cfg.model, dtype=self.dtype).to(self.device)
        enc = shard.encode()
        self.shard = enc.arrays()
        return enc.truncated_prompts, enc.truncated_responses

    def sft(self, src: str, plan: np.ndarray, steps: int, lr: float, seed: int, queue=None):
        """This rank's part of data-parallel SFT of the model at `src` (train/sft.py), in
        float32 (Adam on bfloat16 weights loses small updates); the result becomes the base."""
        from emdpo_ray.models.loading import load_base
        from emdpo_ray.train.sft import train_sft

        def report(done: int, loss: float) -> None:
            if queue is not None and (done % 5 == 0 or done == steps):
                queue.put((done, loss))

        model = load_base(src, self.cfg.model).to(self.device)
        losses = train_sft(model, self.shard, plan, steps, lr, self.cfg.dpo.max_grad_norm,
                           self.device, seed, report)
        # the float32 weights are what is saved; the ranks keep them in the policies' dtype
        state = ({k: v.detach().cpu() for k, v in model.state_dict().items()}
                 if self.rank == 0 else None)
        self.base = model.to(self.dtype)
        return {"state_dict": state, "losses": losses}

    def name_base(self, path: str) -> None:
        """Where the base now lives (saved adapters point their base_model_name_or_path there)."""
        self.base.config._name_or_path = self.base.name_or_path = path

    def reference_logps(self) -> np.ndarray:
        """This shard's reference log-probs, in the dtype the policies train in."""
        from emdpo_ray.models.bank import token_logps
        from emdpo_ray.models.scoring import reference_logps

        self.base.eval()

        def forward(input_ids, position_ids, attention_mask, policy, *scored):
            return token_logps(self.base, input_ids, position_ids, attention_mask, *scored)

        self.ref = reference_logps(forward, self.shard, self.device)
        return self.ref

    def set_reference(self, ref: np.ndarray) -> None:
        self.ref = ref

    def response_features(self, segments: int, dims: int, plan: np.ndarray | None = None,
                          steps: int = 0, lr: float = 0.0, seed: int = 0, end_ids=None):
        """This shard's reference Representations (models/features.py) of em.init_layers,
        for the start; with a `plan`, those of a float32 copy of the base trained further by
        it (data parallel, as `sft`) and then dropped: the base is unchanged."""
        import copy

        from emdpo_ray.models.features import reference_representations as reps
        from emdpo_ray.train.sft import train_sft

        model = self.base if plan is None else copy.deepcopy(self.base).float()
        if plan is not None:
            train_sft(model, self.shard, plan, steps, lr, self.cfg.dpo.max_grad_norm,
                      self.device, seed)
        return reps(model.eval(), self.shard, self.device, segments, dims,
                    layers=self.cfg.start_layers, end_ids=end_ids)

    def fit(self, job: dict, weights: np.ndarray, score_mask: np.ndarray, progress=None):
        import copy

        from emdpo_ray.train.mstep import run_fit

        # A fresh copy each M-step: PEFT injects the adapters into the model it wraps.
        return run_fit(self.cfg, job, copy.deepcopy(self.base), self.shard, self.ref, weights,
                       score_mask, self.rank, self.world, self.device, progress)


@dataclass
class MStepResult:
    rewards: np.ndarray           # [N, A, m] implicit rewards in ranked order (NaN: unscored)
    checkpoint: object            # ray.train.Checkpoint of final/: policies/<name>/
    metrics: dict
    wall_s: float
    worker_failures: int = 0      # groups replaced during this M-step

    def scores(self, tau: float = 1.0) -> np.ndarray:
        """[N, A] Plackett-Luce log-likelihood per record and policy, rewards scaled by tau
        (NaN: unscored)."""
        from emdpo_ray.core.calibration import ranking_loglik

        return ranking_loglik(self.rewards, tau)


class WorkerFailure(RuntimeError):
    """A worker of the group died (process or node lost)."""


class WorkerGroup:
    def __init__(self, cfg: Config, threads: int, storage: str, world: int):
        """Reserve the ranks and start their actors and process group; returns at once (the
        caller prepares the base and the shards meanwhile) and `load` waits for them."""
        self.cfg, self.threads, self.storage, self.world = cfg, threads, storage, world
        self.base_path: str | None = None
        self.shard_refs: list = []
        self.ref_refs: list | None = None
        self.actors: list = []
        self.pg = None
        self.restarts = 0
        self.start_s = 0.0
        self._spawn()

    def _spawn(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._t0 = time.perf_counter()
        cfg = self.cfg
        # All ranks or none (a half-placed group would wait in its first collective).
        self.bundle = {"CPU": self.threads, **({"GPU": 1} if cfg.ray.use_gpu else {})}
        self.pg = placement_group([self.bundle] * self.world, strategy="PACK")
        env = {**WORKER_ENV, "DS_ACCELERATOR": "cuda" if cfg.ray.use_gpu else "cpu"}
        cfg_json = cfg.model_dump(mode="json")
        self.actors = [ray.remote(PolicyWorker).options(
            num_cpus=self.threads, num_gpus=1 if cfg.ray.use_gpu else 0, max_restarts=0,
            runtime_env={"env_vars": env},
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=r)).remote(
                    cfg_json, r, self.world, self.threads) for r in range(self.world)]
        master = self.actors[0].address.remote()
        self._connected = [a.connect.remote(master) for a in self.actors]

    def load(self, base_path: str | None, shard_refs: list, sizes: list[int],
             reference: np.ndarray | None = None) -> None:
        """Every rank gets its shard (refs to `RecordShard`s, encoded there) and the base at
        `base_path` (None: `sft` builds it); waits for the group to be up, and logs what the
        encoding truncated. A replaced group is loaded the same way (`_load`)."""
        import ray

        self.base_path, self.shard_refs, self.sizes = base_path, shard_refs, sizes
        bounds = np.cumsum([0, *sizes])
        self.cuts = [slice(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
        if reference is not None:
            self.ref_refs = [ray.put(reference[c]) for c in self.cuts]
        prompts, responses = self._load()
        if prompts or responses:
            data = self.cfg.data
            log.warning("truncated %d prompts (kept last %d tokens) and %d responses "
                        "(kept first %d tokens)", prompts, data.max_prompt_tokens, responses,
                        data.max_response_tokens)

    def _load(self) -> tuple[int, int]:
        import ray

        try:
            try:
                ray.get(self.pg.ready(), timeout=self.cfg.ray.worker_start_timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(
                    f"the M-step worker group needs {self.world} x {self.bundle} and the cluster "
                    "could not place them within ray.worker_start_timeout_s="
                    f"{self.cfg.ray.worker_start_timeout_s} (free now: "
                    f"{ray.available_resources()}); lower ray.num_workers or "
                    "ray.cpus_per_worker, or free resources") from None
            ray.get(self._connected)
            truncated = ray.get([a.load.remote(self.base_path, s)
                                 for a, s in zip(self.actors, self.shard_refs)])
            if self.ref_refs is not None:
                ray.get([a.set_reference.remote(r) for a, r in zip(self.actors, self.ref_refs)])
        except BaseException:
            self.close()
            raise
        self.start_s = time.perf_counter() - self._t0
        return tuple(int(sum(t[i] for t in truncated)) for i in (0, 1))

    def _restart(self) -> None:
        self.close()
        self._spawn()
        self._load()
        self.restarts += 1

    def close(self) -> None:
        """Kill the ranks and free their CPUs. Returns once Ray reports the CPUs free (up to
        5 s): its resource view lags the removal, and whoever sizes the next group or task
        from the free CPUs (RayRuntime) would otherwise see this group's as taken."""
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        if self.pg is not None:
            placed = ray.util.placement_group_table(self.pg).get("state") == "CREATED"
            free = ray.available_resources().get("CPU", 0.0)
            total = ray.cluster_resources().get("CPU", 0.0)
            ray.util.remove_placement_group(self.pg)
            self.pg = None
            want = min(total, free + self.world * self.bundle["CPU"]) if placed else 0.0
            deadline = time.monotonic() + 5
            while ray.available_resources().get("CPU", 0.0) < want and time.monotonic() < deadline:
                time.sleep(0.02)

    def sft(self, src: str, plans: list[np.ndarray], steps: int, lr: float, seed: int,
            on_steps=None) -> dict:
        """Data-parallel SFT of the model at `src` (train/sft.py); every rank keeps the result
        as its base. Rank 0's {"state_dict", "losses"}. A lost worker fails it: SFT is redone
        by the next attempt (nothing was saved)."""
        import ray

        plan_refs = [ray.put(p) for p in plans]
        return self._on_ranks(lambda a, r, q: a.sft.remote(src, plan_refs[r], steps, lr, seed, q),
                              on_steps)

    def _on_ranks(self, call, on_steps=None):
        """`call(actor, rank, queue)` on every rank (the queue, for rank 0 only, carries its
        step reports to `on_steps`); rank 0's result."""
        import ray
        from ray.util.queue import Queue

        queue = Queue() if on_steps is not None else None
        try:
            refs = [call(a, r, queue if r == 0 else None) for r, a in enumerate(self.actors)]
            return _gather(refs, queue, on_steps)[0]
        finally:
            if queue is not None:
                ray.kill(queue.actor)

    def use_base(self, base_path: str) -> None:
        """Where the base the ranks hold (after `sft`) now lives: a replaced worker loads it
        from there."""
        import ray

        self.base_path = base_path
        ray.get([a.name_base.remote(base_path) for a in self.actors])

    def reference_logps(self) -> np.ndarray:
        import ray

        parts = ray.get([a.reference_logps.remote() for a in self.actors])
        self.ref_refs = [ray.put(p) for p in parts]  # a replaced worker gets them back
        return np.concatenate(parts)

    def response_features(self, plans: list[np.ndarray] | None = None, steps: int = 0,
                          lr: float = 0.0, seed: int = 0, end_ids: np.ndarray | None = None):
        """Starts computing the reference representations of every response on every rank
        (models/features.py), of a copy trained further by `plans` (train/sft.py) when given,
        pooled by sentence when given the tokens that end one (`end_ids`), else by thirds;
        the function returned gathers them in record order (Representations)."""
        import ray

        from emdpo_ray.models.features import DIMS, SEGMENTS, Representations

        plan_refs = ([ray.put(p) for p in plans] if plans is not None
                     else [None] * len(self.actors))
        refs = [a.response_features.remote(SEGMENTS, DIMS, p, steps, lr, seed, end_ids)
                for a, p in zip(self.actors, plan_refs)]

        def gather() -> Representations:   # each field: the ranks' shards, in record order
            return Representations(*map(np.concatenate, zip(*ray.get(refs))))

        return gather

    def fit(self, job: dict, weights: np.ndarray, score_mask: np.ndarray,
            on_steps=None) -> MStepResult:
        """Train and score on every rank; a lost worker replaces the group and the M-step
        resumes from its newest checkpoint. `job`: names, num_types, seed, epochs, init_from
        (a Checkpoint or None), run_name."""
        import ray

        t0 = time.perf_counter()
        w_refs = [ray.put(weights[c]) for c in self.cuts]
        m_refs = [ray.put(score_mask[c]) for c in self.cuts]
        job = {**job, "fit_uri": f"{self.storage}/{job['run_name']}", "max_shard": max(self.sizes),
               "weight_means": weights.mean(0).tolist(), "resume": False}
        failures = 0
        while True:
            try:
                out = self._on_ranks(
                    lambda a, r, q: a.fit.remote(job, w_refs[r], m_refs[r], q), on_steps)
                break
            except WorkerFailure as e:
                failures += 1
                limit = self.cfg.ray.max_failures
                if limit != -1 and failures > limit:
                    raise WorkerFailure(f"M-step {job['run_name']}: {failures} worker failures "
                                        f"(ray.max_failures={limit}): {e}") from e
                log.warning("M-step %s: %s; replacing the worker group (%d/%s)",
                            job["run_name"], e, failures, limit)
                self._restart()
                job["resume"] = True
        from emdpo_ray.run.storage import checkpoint_from

        return MStepResult(out["rewards"], checkpoint_from(out["checkpoint"]), out["metrics"],
                           time.perf_counter() - t0, failures)


def _gather(refs: list, queue, on_steps) -> list:
    """Every rank's result, passing rank 0's step reports on as they come. A dead worker
    raises WorkerFailure once its peers have failed or had time to; any other error in a
    live worker is a bug and is raised as is."""
    import ray
    from ray.exceptions import RayActorError

    pending, done = list(refs), {}
    first_error = None
    deadline = None
    while pending:
        ready, pending = ray.wait(pending, timeout=0.5)
        for r in ready:
            try:
                done[r] = ray.get(r)
            except RayActorError as e:
                raise WorkerFailure(str(e).splitlines()[0]) from e
            except Exception as e:  # a peer's collective failing may precede the death report
                first_error = first_error or e
                deadline = deadline or time.monotonic() + 20
        if queue is not None:
            while not queue.empty():
                on_steps(*queue.get())
        if first_error is not None and (not pending or time.monotonic() > deadline):
            raise first_error
    if queue is not None:
        while not queue.empty():
            on_steps(*queue.get())
    return [done[r] for r in refs]
