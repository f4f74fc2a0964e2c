"""Ray behind one object: start-up, CPUs per worker, fan-out of tasks.

    rt = RayRuntime(cfg)                     # this process's Ray, started once
    parts = rt.fan_out(score_chunk, [(chunk, ...) for chunk in chunks])

Without an address a fresh in-process local Ray starts (never a stray `ray start` cluster
found on the machine); inside a Ray job `RAY_ADDRESS` names the cluster. The resident
training workers are train/workers.py's; this covers start-up and plain tasks.
"""

from __future__ import annotations

import logging
import os

from emdpo_ray.config import Config


class RayRuntime:
    def __init__(self, cfg: Config, verbose: bool = False):
        import ray

        if not ray.is_initialized():
            address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
            kw = {"log_to_driver": verbose}
            if not verbose:
                kw["logging_level"] = logging.ERROR
            if not address:
                # The dashboard serves the job API (submit = run code): loopback only.
                kw.update(include_dashboard=cfg.ray.dashboard, dashboard_host="127.0.0.1")
            ray.init(address=address or "local", **kw)
        self.ray = ray
        cpus = int(ray.available_resources().get("CPU", 1))
        # torch threads per worker: what the config asks, within this cluster's free CPUs
        self.threads = max(1, min(cfg.ray.cpus_per_worker, cpus // cfg.ray.num_workers or 1))

    def put(self, obj):
        return self.ray.put(obj)

    def fan_out(self, fn, jobs: list[tuple]) -> list:
        """`fn(*job)` for every job as one Ray task with `threads` CPUs; results in order."""
        task = self.ray.remote(num_cpus=self.threads)(fn)
        return self.ray.get([task.remote(*job) for job in jobs])
